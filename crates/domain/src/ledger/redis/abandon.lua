-- abandon: up to ARGV[3] of the reservations still waiting for the upstream since before ARGV[2]
-- become unknown outcomes, each with its period's totals. redis.rs calls it again while batches
-- come back full: after a long outage there can be very many, and one script holds up every
-- replica's Redis calls for as long as it runs.
-- ARGV: prefix, before (unix ms, exclusive), batch size
-- Returns: {abandoned, looked at}
local ids = redis.call('ZRANGEBYSCORE', K.by_state('reserved'), '-inf', '(' .. ARGV[2],
  'LIMIT', 0, ARGV[3])
local abandoned = 0
for _, id in ipairs(ids) do
  if not move_reservation(id, 'reserved', 'unknown_outcome', true) then
    abandoned = abandoned + 1
  end
end
return { abandoned, #ids }
