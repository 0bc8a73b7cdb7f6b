-- abandon: every reservation still waiting for the upstream since before ARGV[2] becomes an
-- unknown outcome, each with its period's totals, in one step.
-- ARGV: prefix, before (unix ms, exclusive)
local ids = redis.call('ZRANGEBYSCORE', K.by_state('reserved'), '-inf', '(' .. ARGV[2])
local abandoned = 0
for _, id in ipairs(ids) do
  if not move_reservation(id, 'reserved', 'unknown_outcome', true) then
    abandoned = abandoned + 1
  end
end
return abandoned
