-- finish: records how an attempt ended and moves the delivery between the indexes in one step;
-- a late report about a delivery that is no longer pending, or about an attempt that is not its
-- latest (the lease ran out and another claim followed), changes nothing.
-- ARGV: prefix, id, new state, next attempt or '', has error ('1' or ''), error, at, attempt
local id, state, next_attempt, has_error, last_error, at, attempt =
  ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1', ARGV[6], ARGV[7], ARGV[8]
local key = K.delivery(id)
local r = redis.call('HMGET', key, 'state', 'team', 'attempts')
if r[1] ~= 'pending' or r[3] ~= attempt then return 0 end
local due = K.due(r[2])
redis.call('HSET', key, 'state', state, 'updated_at', at)
if has_error then redis.call('HSET', key, 'last_error', last_error) end
redis.call('ZREM', K.deliveries('pending'), id)
redis.call('ZADD', K.deliveries(state), at, id)
if state == 'pending' then
  redis.call('HSET', key, 'next_attempt_at', next_attempt)
  redis.call('ZADD', due, next_attempt, id)
else
  redis.call('ZREM', due, id)
  if redis.call('ZCARD', due) == 0 then redis.call('SREM', K.due_teams, r[2]) end
  -- Nothing sends it again, and a callback's body can be megabytes of images.
  redis.call('HDEL', key, 'body')
end
return 1
