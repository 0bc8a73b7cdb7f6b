-- close: settles or expires an open task in one step, so of many concurrent calls exactly one
-- finds it open; its reservation leaves the period's held credits and what it consumed is spent.
-- ARGV: prefix, task id, to state, consumed units or '' (= its reservation), final status or '',
--       at
local task_id, to, consumed, status, at = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local id = redis.call('GET', K.task(task_id))
if not id then return { 'not_open' } end
local key = K.reservation(id)
local r = redis.call('HMGET', key, 'state', 'team', 'model', 'period', 'reserved', 'created_at',
  'key_label', 'cost_count', 'cost_value')
local state, team, model, period, reserved, created = r[1], r[2], r[3], r[4], r[5], r[6]
if state ~= 'open' then
  if state == 'settled' or state == 'released' or state == 'expired' then
    return { 'already_closed' }
  end
  return { 'not_open' }
end
if consumed == '' then consumed = reserved end
redis.call('HSET', key, 'state', to, 'consumed', consumed, 'settled_at', at, 'observed_at', at)
if status ~= '' then redis.call('HSET', key, 'final_status', status) end
redis.call('ZREM', K.by_state('open'), id)
redis.call('ZADD', K.by_state(to), created, id)
redis.call('ZREM', K.unobserved, id)
redis.call('SREM', K.in_flight(team), id)
adjust(team, period, negate(reserved), consumed)
-- No key name on those recorded before keys were.
return { 'settled', team, model, reserved, consumed, r[7] or '', r[8], r[9] }
