-- GCRA for one limit, shared by every replica on this Redis.
-- KEYS[1]: the limit's key. ARGV[1]: emission interval in microseconds (the time one request
-- "costs"); ARGV[2]: burst. Returns {allowed (1/0), remaining, reset in microseconds}: until the
-- limit is whole again when allowed, until the next request may pass when refused.
-- Redis's own clock, so replicas' clocks never matter. Times in microseconds since the epoch
-- (about 1.8e15) stay well below 2^53, exact in Lua's doubles; they are written with %.0f, as
-- Lua's tostring would round them to 14 digits.
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
    tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
    return {0, 0, allow_at - now}
end
local expire_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', expire_ms))
return {1, math.floor((now - allow_at) / interval), new_tat - now}
