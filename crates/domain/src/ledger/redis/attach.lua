-- attach: the task id is claimed for one reservation and the reservation opens in one step, so a
-- task id can never belong to two teams.
-- ARGV: prefix, reservation id, task id
local id, task_id = ARGV[2], ARGV[3]
local key = K.reservation(id)
local r = redis.call('HMGET', key, 'state', 'created_at', 'observed_at')
if r[1] ~= 'reserved' then return { 'conflict', 'reservation ' .. id .. ' is not held' } end
if redis.call('SETNX', K.task(task_id), id) == 0 then
  return { 'conflict', 'task ' .. task_id .. ' is already recorded' }
end
redis.call('HSET', key, 'task_id', task_id, 'state', 'open')
redis.call('ZREM', K.by_state('reserved'), id)
redis.call('ZADD', K.by_state('open'), r[2], id)
redis.call('ZADD', K.unobserved, r[3] or r[2], id)
return { 'ok' }
