-- attach: the task id is claimed for one reservation and the reservation opens in one step, so a
-- task id can never belong to two teams. A reservation given up as an unknown outcome while its
-- request still waited (the ledger was slow, not the gateway dead) opens too: what was counted
-- as spent is held again, until the task settles at what it consumed.
-- ARGV: prefix, reservation id, task id
local id, task_id = ARGV[2], ARGV[3]
local key = K.reservation(id)
local r = redis.call('HMGET', key, 'state', 'created_at', 'observed_at', 'task_id', 'team',
  'period', 'reserved')
local state, team, period, amount = r[1], r[5], r[6], r[7]
local given_up = state == 'unknown_outcome' and not r[4]
if state ~= 'reserved' and not given_up then
  return { 'conflict', 'reservation ' .. id .. ' is not held' }
end
if redis.call('SETNX', K.task(task_id), id) == 0 then
  return { 'conflict', 'task ' .. task_id .. ' is already recorded' }
end
redis.call('HSET', key, 'task_id', task_id, 'state', 'open')
redis.call('ZREM', K.by_state(state), id)
redis.call('ZADD', K.by_state('open'), r[2], id)
redis.call('ZADD', K.unobserved, r[3] or r[2], id)
if given_up then
  redis.call('SADD', K.in_flight(team), id)
  adjust(team, period, amount, negate(amount))
end
return { 'ok' }
