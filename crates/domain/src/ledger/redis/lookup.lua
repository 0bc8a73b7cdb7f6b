-- lookup: follows a task id or callback digest to its reservation's fields in one round trip
-- (every status query reads a task's owner). Writes nothing.
-- ARGV: prefix, index key (task:… or callback:…), fields…
local id = redis.call('GET', ARGV[2])
if not id then return false end
return redis.call('HMGET', K.reservation(id), unpack(ARGV, 3))
