-- dispatch: notes that a held reservation's request is about to leave for the upstream. Refused
-- unless it is still reserved, so that one given up as never sent is not sent after all.
-- ARGV: prefix, reservation id, at (unix ms)
local id, at = ARGV[2], ARGV[3]
local key = K.reservation(id)
if redis.call('HGET', key, 'state') ~= 'reserved' then
  return { 'conflict', 'reservation ' .. id .. ' is not held' }
end
redis.call('HSET', key, 'dispatch', 'sent', 'dispatched_at', at)
return { 'ok' }
