-- attach: the task id is claimed for one reservation and the reservation opens in one step, so a
-- task id can never belong to two teams. A reservation given up as an unknown outcome while its
-- request still waited (the ledger was slow, not the gateway dead) opens too: what was counted
-- as spent is held again, until the task settles at what it consumed. With an answer, it becomes
-- what the reservation's Idempotency-Key replays (if the key is still its own), and the earlier
-- attempts with that key whose outcome is still unknown (the `retry_of` chain, which only points
-- at older reservations) are released: the team pays for the task it got.
-- ARGV: prefix, reservation id, task id, has answer ('1' or ''), status, content type, body
-- Returns: {'ok', the ids of the attempts released}
local id, task_id = ARGV[2], ARGV[3]
local has_answer = ARGV[4] == '1'
local key = K.reservation(id)
local r = redis.call('HMGET', key, 'state', 'created_at', 'observed_at', 'team',
  'idempotency_key', 'retry_of', 'task_id', 'period', 'reserved')
local state, team = r[1], r[4]
local given_up = state == 'unknown_outcome' and not r[7]
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
  adjust(team, r[8], r[9], negate(r[9]))
end

if has_answer and r[5] then
  local claim = K.idempotency(team, r[5])
  if redis.call('HGET', claim, 'reservation') == id then
    redis.call('HSET', claim, 'status', ARGV[5], 'content_type', ARGV[6], 'body', ARGV[7])
  end
end
local answer = { 'ok' }
local earlier = r[6]
while earlier do
  local attempt = redis.call('HMGET', K.reservation(earlier), 'state', 'retry_of')
  if attempt[1] == 'unknown_outcome' then
    move_reservation(earlier, 'unknown_outcome', 'released', false, '')
    redis.call('HSET', K.reservation(earlier), 'resolved_by', id)
    table.insert(answer, earlier)
  end
  earlier = attempt[2]
end
return answer
