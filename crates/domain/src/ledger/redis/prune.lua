-- prune: deletes up to a number of deliveries that ended (delivered or dead) before a time,
-- oldest first in each state, with the keys that lead to them; returns how many.
-- ARGV: prefix, finished before (exclusive), most to delete
local before, limit = ARGV[2], tonumber(ARGV[3])
local deleted = 0
for _, state in ipairs({ 'delivered', 'dead' }) do
  if deleted >= limit then break end
  local index = K.deliveries(state)
  local ids = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. before, 'LIMIT', 0, limit - deleted)
  for _, id in ipairs(ids) do
    local key = K.delivery(id)
    local task_id = redis.call('HGET', key, 'task_id')
    if task_id and redis.call('GET', K.delivery_of_task(task_id)) == id then
      redis.call('DEL', K.delivery_of_task(task_id))
    end
    redis.call('DEL', key)
    redis.call('ZREM', index, id)
    deleted = deleted + 1
  end
end
return deleted
