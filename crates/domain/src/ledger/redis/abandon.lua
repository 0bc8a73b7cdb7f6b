-- abandon: up to ARGV[3] of the reservations still waiting for the upstream since before ARGV[2]
-- are given up, each with its period's totals: one dispatched (or made by a version that did not
-- record dispatch, so perhaps sent) becomes an unknown outcome, one never dispatched is released.
-- One dispatched at or after ARGV[2] is left for a later pass: its upstream call started late.
-- redis.rs calls it again while batches come back full: after a long outage there can be very
-- many, and one script holds up every replica's Redis calls for as long as it runs.
-- ARGV: prefix, before (unix ms, exclusive), batch size
-- Returns: {became unknown outcomes, released, looked at}
local before = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', K.by_state('reserved'), '-inf', '(' .. ARGV[2],
  'LIMIT', 0, ARGV[3])
local unknown, released = 0, 0
for _, id in ipairs(ids) do
  local key = K.reservation(id)
  local r = redis.call('HMGET', key, 'dispatch', 'dispatched_at', 'created_at')
  if r[1] == 'pending' then
    if not move_reservation(id, 'reserved', 'released', false, 'never_dispatched') then
      released = released + 1
    end
  elseif not r[2] or tonumber(r[2]) < before then
    if not r[1] then redis.call('HSET', key, 'dispatched_at', r[3]) end
    if not move_reservation(id, 'reserved', 'unknown_outcome', true, 'no_answer_recorded') then
      unknown = unknown + 1
    end
  end
end
return { unknown, released, #ids }
