-- enqueue: the check that the task has no delivery yet and the insert are one step, so the same
-- callback reaching two replicas is queued once.
-- ARGV: prefix, id, task id, team, url, body, created at, deadline
local id, task_id, created = ARGV[2], ARGV[3], ARGV[7]
local key = K.delivery(id)
if redis.call('EXISTS', key) == 1 then return 0 end
if redis.call('SETNX', K.delivery_of_task(task_id), id) == 0 then return 0 end
redis.call('HSET', key, 'id', id, 'task_id', task_id, 'team', ARGV[4], 'url', ARGV[5],
  'body', ARGV[6], 'state', 'pending', 'attempts', 0, 'next_attempt_at', created,
  'created_at', created, 'deadline', ARGV[8], 'updated_at', created)
redis.call('ZADD', K.due(ARGV[4]), created, id)
redis.call('SADD', K.due_teams, ARGV[4])
redis.call('ZADD', K.deliveries('pending'), created, id)
return 1
