-- record_admin_action: numbers an admin action and adds it to the trail in one step, so ids
-- follow the order actions were recorded in, on every replica, and are never reused.
-- ARGV: prefix, the action as JSON (without its id)
local id = redis.call('INCR', P .. 'audit-seq')
redis.call('ZADD', P .. 'audit', id, id .. '|' .. ARGV[2])
return id
