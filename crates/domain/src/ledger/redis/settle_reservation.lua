-- settle_reservation: settles a reservation that has no task (a text request) at what its
-- answer cost, in one step, so of many concurrent calls exactly one finds it held. From
-- 'reserved' its reservation leaves the held credits; from 'unknown_outcome' (given up on while
-- the answer still ran) it was counted as spent already, so only the difference is added.
-- ARGV: prefix, reservation id, consumed units, final status, at
local id, consumed, status, at = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = K.reservation(id)
local r = redis.call('HMGET', key, 'state', 'team', 'model', 'period', 'reserved', 'created_at',
  'key_label')
local state, team, model, period, reserved, created = r[1], r[2], r[3], r[4], r[5], r[6]
if state == 'settled' or state == 'released' or state == 'expired' then
  return { 'already_closed' }
end
if state ~= 'reserved' and state ~= 'unknown_outcome' then return { 'not_open' } end
redis.call('HSET', key, 'state', 'settled', 'consumed', consumed, 'final_status', status,
  'settled_at', at, 'observed_at', at)
redis.call('ZREM', K.by_state(state), id)
redis.call('ZADD', K.by_state('settled'), created, id)
if state == 'reserved' then
  redis.call('SREM', K.in_flight(team), id)
  adjust(team, period, negate(reserved), consumed)
else
  redis.call('HINCRBY', K.period(team, period), 'spent', negate(reserved))
  adjust(team, period, '0', consumed)
end
-- No key name on those recorded before keys were.
return { 'settled', team, model, reserved, r[7] or '' }
