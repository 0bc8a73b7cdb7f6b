-- claim: leases due deliveries in one step, so one replica attempts each at a time. The due time
-- becomes the end of the lease (a replica that dies mid-attempt only delays the delivery) and the
-- attempt is counted.
-- ARGV: prefix, now, lease until, limit
local lease_until = ARGV[3]
local ids = redis.call('ZRANGEBYSCORE', K.due, '-inf', ARGV[2], 'LIMIT', 0, ARGV[4])
local claimed = {}
for i, id in ipairs(ids) do
  local key = K.delivery(id)
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'next_attempt_at', lease_until)
  redis.call('ZADD', K.due, lease_until, id)
  claimed[i] = redis.call('HMGET', key,
    'id', 'task_id', 'team', 'url', 'body', 'attempts', 'created_at', 'deadline')
end
return claimed
