-- The head of every ledger script: redis.rs puts it in front of each one.
--
-- ARGV[1] is the key prefix. Scripts build their keys here, the same way `Keys` does in redis.rs,
-- because the period, in-flight and index keys of a reservation follow from fields of its hash,
-- which the caller cannot know before the script has read them. That holds on one Redis server
-- (a cluster would need every key in one slot).
--
-- Money travels as decimal strings of integer units (1e-8 credit) and changes only through
-- HINCRBY, which is exact over the whole i64 range. Lua numbers are doubles, exact up to 2^53
-- units (about 9e7 credits): only the budget comparison in reserve.lua computes with them.
local P = ARGV[1]

-- The team is the first of two free parts in a period key: escaping ':' keeps the key unambiguous.
local function escape(part)
  return (string.gsub(part, '[%%:]', { ['%'] = '%25', [':'] = '%3A' }))
end

local K = {
  reservation = function(id) return P .. 'reservation:' .. id end,
  task = function(task_id) return P .. 'task:' .. task_id end,
  callback = function(digest) return P .. 'callback:' .. digest end,
  period = function(team, period) return P .. 'period:' .. escape(team) .. ':' .. period end,
  in_flight = function(team) return P .. 'in-flight:' .. team end,
  created = P .. 'created',
  created_by = function(team) return P .. 'created:' .. team end,
  by_state = function(state) return P .. 'state:' .. state end,
  idempotency = function(team, key) return P .. 'idempotency:' .. escape(team) .. ':' .. key end,
  unobserved = P .. 'open-by-last-seen',
  delivery = function(id) return P .. 'delivery:' .. id end,
  delivery_of_task = function(task_id) return P .. 'delivery-of-task:' .. task_id end,
  -- Each team's pending deliveries by due time, and the teams that have any: a claim reads
  -- only what each team may take, never the deliveries of a team that must wait.
  due = function(team) return P .. 'deliveries-due:' .. team end,
  due_teams = P .. 'deliveries-due-teams',
  -- All teams' pending deliveries in one set, as versions before the per-team sets kept them.
  due_before_teams = P .. 'deliveries-due',
  deliveries = function(state) return P .. 'deliveries:' .. state end,
  settled_costs = function(day) return P .. 'settled-costs:' .. day end,
}

-- Negates a unit string without going through a double.
local function negate(units)
  if units == '0' then return '0' end
  if string.sub(units, 1, 1) == '-' then return string.sub(units, 2) end
  return '-' .. units
end

-- Adds to a period's totals. Runs beside every change of a reservation's state, so the totals
-- always equal the sum over the reservations.
local function adjust(team, period, reserved, spent)
  local key = K.period(team, period)
  if reserved ~= '0' then redis.call('HINCRBY', key, 'reserved', reserved) end
  if spent ~= '0' then redis.call('HINCRBY', key, 'spent', spent) end
end

-- Moves a reservation out of `from`; `charge` says whether its held amount becomes spent (unknown
-- outcome) or is given back, `reason` (or '') why. Returns why not when the reservation is not in
-- `from`.
local function move_reservation(id, from, to, charge, reason)
  local key = K.reservation(id)
  local r = redis.call('HMGET', key, 'state', 'team', 'period', 'reserved', 'created_at')
  if r[1] ~= from then return 'reservation ' .. id .. ' is not ' .. from end
  local team, period, amount, created = r[2], r[3], r[4], r[5]
  redis.call('HSET', key, 'state', to)
  if reason ~= '' then redis.call('HSET', key, 'reason', reason) end
  redis.call('ZREM', K.by_state(from), id)
  redis.call('ZADD', K.by_state(to), created, id)
  if from == 'reserved' then
    redis.call('SREM', K.in_flight(team), id)
    adjust(team, period, negate(amount), charge and amount or '0')
  else
    -- Leaving a state that counted as spent.
    adjust(team, period, '0', negate(amount))
  end
  return nil
end

-- Queues a webhook delivery unless its id or its task has one already; returns 1 if queued, else
-- 0. The check and the insert are one step with whatever else the calling script does.
local function queue_delivery(id, task_id, team, url, body, created, deadline)
  local key = K.delivery(id)
  if redis.call('EXISTS', key) == 1 then return 0 end
  if redis.call('SETNX', K.delivery_of_task(task_id), id) == 0 then return 0 end
  redis.call('HSET', key, 'id', id, 'task_id', task_id, 'team', team, 'url', url,
    'body', body, 'state', 'pending', 'attempts', 0, 'next_attempt_at', created,
    'created_at', created, 'deadline', deadline, 'updated_at', created)
  redis.call('ZADD', K.due(team), created, id)
  redis.call('SADD', K.due_teams, team)
  redis.call('ZADD', K.deliveries('pending'), created, id)
  return 1
end
