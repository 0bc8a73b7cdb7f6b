-- enqueue: the check that the task has no delivery yet and the insert are one step, so the same
-- callback reaching two replicas is queued once.
-- ARGV: prefix, id, task id, team, url, body, created at, deadline
return queue_delivery(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
