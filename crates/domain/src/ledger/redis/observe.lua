-- observe: the read time and the reconciler's index of open tasks change together.
-- ARGV: prefix, task id, at
local id = redis.call('GET', K.task(ARGV[2]))
if not id then return 0 end
local key = K.reservation(id)
redis.call('HSET', key, 'observed_at', ARGV[3])
if redis.call('HGET', key, 'state') == 'open' then
  redis.call('ZADD', K.unobserved, ARGV[3], id)
end
return 1
