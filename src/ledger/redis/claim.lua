-- claim: leases due deliveries in one step, so one replica attempts each at a time. The due time
-- becomes the end of the lease (a replica that dies mid-attempt only delays the delivery) and the
-- attempt is counted. A team whose share of the attempts is taken keeps its due deliveries as
-- they are, attempts uncounted, and the next ones due go to other teams.
-- ARGV: prefix, now, lease until, limit, per-team share, then pairs of team and its attempts
-- in flight
local now, lease_until = ARGV[2], ARGV[3]
local limit, share = tonumber(ARGV[4]), tonumber(ARGV[5])
local busy = {}
for i = 6, #ARGV, 2 do busy[ARGV[i]] = tonumber(ARGV[i + 1]) end

-- Chosen first and leased after: leasing moves a delivery out of the due range being paged.
local chosen = {}
local page = math.max(limit * 4, 64)
local offset = 0
while #chosen < limit do
  local ids = redis.call('ZRANGEBYSCORE', K.due, '-inf', now, 'LIMIT', offset, page)
  for _, id in ipairs(ids) do
    local team = redis.call('HGET', K.delivery(id), 'team')
    local taken = busy[team] or 0
    if taken < share then
      busy[team] = taken + 1
      chosen[#chosen + 1] = id
      if #chosen == limit then break end
    end
  end
  if #ids < page then break end
  offset = offset + page
end

local claimed = {}
for i, id in ipairs(chosen) do
  local key = K.delivery(id)
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'next_attempt_at', lease_until)
  redis.call('ZADD', K.due, lease_until, id)
  claimed[i] = redis.call('HMGET', key,
    'id', 'task_id', 'team', 'url', 'body', 'attempts', 'created_at', 'deadline')
end
return claimed
