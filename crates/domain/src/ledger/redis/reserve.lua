-- reserve: the Idempotency-Key's claim, the budget and in-flight checks and the record of the
-- reservation are one step, so two replicas can never both take the last credits, nor both send
-- one key's request.
-- ARGV: prefix, id, team, model, family, period, amount, limit or '', max in flight or '',
--       request id, created at, has callback ('1' or ''), callback digest, has forward ('1' or
--       ''), forward to, has key ('1' or ''), key, fingerprint, key expires at, the name of
--       the team key that made it, cost count or '' (no cost key), has cost value ('1' or ''),
--       cost value
local id, team, model, family, period = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local amount, limit, max_in_flight, request_id = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local created = ARGV[11]
local has_callback, digest = ARGV[12] == '1', ARGV[13]
local has_forward, forward_to = ARGV[14] == '1', ARGV[15]
local has_key, idempotency_key, fingerprint, expires = ARGV[16] == '1', ARGV[17], ARGV[18], ARGV[19]
local key_label = ARGV[20]
local cost_count, has_cost_value, cost_value = ARGV[21], ARGV[22] == '1', ARGV[23]

-- The key first: a repeat gets its answer even when the budget is spent by now.
local claim, retry_of = nil, nil
if has_key then
  claim = K.idempotency(team, idempotency_key)
  local k = redis.call('HMGET', claim, 'fingerprint', 'reservation', 'expires_at', 'status',
    'content_type', 'body')
  -- An expired claim is no claim, whether Redis has dropped it yet or not.
  if k[1] and tonumber(k[3]) > tonumber(created) then
    if k[1] ~= fingerprint then return { 'key_mismatch' } end
    if k[4] then return { 'replay', k[4], k[5], k[6] } end
    local attempt = redis.call('HMGET', K.reservation(k[2]), 'state', 'retry_of')
    if attempt[1] == 'unknown_outcome' then
      retry_of = k[2]
    elseif attempt[1] == 'released' or not attempt[1] then
      -- Refused: nothing started, so the attempt before it is still the one to resolve.
      retry_of = attempt[2] or nil
    else
      -- Waiting for the upstream. A task, once attached, stores its answer in the same step, so
      -- no other state comes without one; should it, refusing cannot start a second render.
      return { 'key_in_use' }
    end
  end
end

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
-- `dispatch` is `pending` until the request is marked as sent (dispatch.lua).
redis.call('HSET', key, 'id', id, 'team', team, 'model', model, 'family', family,
  'period', period, 'reserved', amount, 'state', 'reserved', 'request_id', request_id,
  'created_at', created, 'dispatch', 'pending', 'key_label', key_label)
if has_callback then redis.call('HSET', key, 'callback_digest', digest) end
if has_forward then redis.call('HSET', key, 'forward_to', forward_to) end
if cost_count ~= '' then redis.call('HSET', key, 'cost_count', cost_count) end
if has_cost_value then redis.call('HSET', key, 'cost_value', cost_value) end
if claim then
  redis.call('HSET', key, 'idempotency_key', idempotency_key)
  if retry_of then redis.call('HSET', key, 'retry_of', retry_of) end
  -- The claim lives as long as the key: Redis drops it then, so claims stay bounded.
  redis.call('DEL', claim)
  redis.call('HSET', claim, 'fingerprint', fingerprint, 'reservation', id, 'expires_at', expires)
  redis.call('PEXPIRE', claim, math.max(1, tonumber(expires) - tonumber(created)))
end
redis.call('SADD', K.in_flight(team), id)
redis.call('ZADD', K.created, created, id)
redis.call('ZADD', K.created_by(team), created, id)
redis.call('ZADD', K.by_state('reserved'), created, id)
adjust(team, period, amount, '0')
local after = redis.call('HMGET', K.period(team, period), 'spent', 'reserved')
return { 'reserved', after[1] or '0', after[2] or '0' }
