-- reserve: the budget and in-flight checks and the record of the reservation are one step, so two
-- replicas can never both take the last credits.
-- ARGV: prefix, id, team, model, family, period, amount, limit or '', max in flight or '',
--       request id, created at, has callback ('1' or ''), callback digest, has forward ('1' or
--       ''), forward to
local id, team, model, family, period = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local amount, limit, max_in_flight, request_id = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local created = ARGV[11]
local has_callback, digest = ARGV[12] == '1', ARGV[13]
local has_forward, forward_to = ARGV[14] == '1', ARGV[15]

local totals = redis.call('HMGET', K.period(team, period), 'spent', 'reserved')
local spent, held = totals[1] or '0', totals[2] or '0'
if limit ~= '' and tonumber(spent) + tonumber(held) + tonumber(amount) > tonumber(limit) then
  return { 'budget_exhausted', spent, held }
end
-- Counted from the set of unsettled reservations, not a counter that could drift.
if max_in_flight ~= '' then
  local in_flight = redis.call('SCARD', K.in_flight(team))
  if in_flight >= tonumber(max_in_flight) then return { 'too_many_in_flight', in_flight } end
end

local key = K.reservation(id)
if redis.call('EXISTS', key) == 1 then
  return { 'conflict', 'reservation ' .. id .. ' is recorded already' }
end
if has_callback and redis.call('SETNX', K.callback(digest), id) == 0 then
  return { 'conflict', 'the callback token of reservation ' .. id .. ' is in use already' }
end
redis.call('HSET', key, 'id', id, 'team', team, 'model', model, 'family', family,
  'period', period, 'reserved', amount, 'state', 'reserved', 'request_id', request_id,
  'created_at', created)
if has_callback then redis.call('HSET', key, 'callback_digest', digest) end
if has_forward then redis.call('HSET', key, 'forward_to', forward_to) end
redis.call('SADD', K.in_flight(team), id)
redis.call('ZADD', K.created, created, id)
redis.call('ZADD', K.created_by(team), created, id)
redis.call('ZADD', K.by_state('reserved'), created, id)
adjust(team, period, amount, '0')
local after = redis.call('HMGET', K.period(team, period), 'spent', 'reserved')
return { 'reserved', after[1] or '0', after[2] or '0' }
