-- calibrate: adds one settled task's cost to its day's record (see calibration.rs), and deletes
-- the records of the day the window has just left; each record also expires once the window no
-- longer covers its day, should no cost be settled on the day after.
-- ARGV: prefix, day, member (the model and value as JSON), over ('1' or ''), cost units, bucket
--       units, time to live (ms), the day just before the window
local day, member, over, cost, bucket = ARGV[2], ARGV[3], ARGV[4] == '1', ARGV[5], ARGV[6]
local ttl, stale = ARGV[7], ARGV[8]
local index = K.settled_costs(day)
local key = index .. ':' .. member
redis.call('SADD', index, member)
redis.call('HINCRBY', key, 'settled', 1)
if over then redis.call('HINCRBY', key, 'over', 1) end
-- Units compared as digit strings (no leading zeros, never negative), not as doubles.
local max = redis.call('HGET', key, 'max')
if not max or #cost > #max or (#cost == #max and cost > max) then
  redis.call('HSET', key, 'max', cost)
end
redis.call('HINCRBY', key, 'b:' .. bucket, 1)
redis.call('PEXPIRE', index, ttl)
redis.call('PEXPIRE', key, ttl)
local old = K.settled_costs(stale)
for _, gone in ipairs(redis.call('SMEMBERS', old)) do
  redis.call('DEL', old .. ':' .. gone)
end
redis.call('DEL', old)
return { 'ok' }
