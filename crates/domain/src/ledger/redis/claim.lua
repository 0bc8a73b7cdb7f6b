-- claim: leases due deliveries in one step, so one replica attempts each at a time. The due time
-- becomes the end of the lease (a replica that dies mid-attempt only delays the delivery) and the
-- attempt is counted. A team whose share of the attempts is taken keeps its due deliveries as
-- they are, attempts uncounted, and the next ones due go to other teams. Each team's due
-- deliveries are read from its own set, at most as many as it may take: a claim costs the same
-- however many deliveries a waiting team has due.
-- ARGV: prefix, now, lease until, limit, per-team share, then pairs of team and its attempts
-- in flight
local now, lease_until = ARGV[2], ARGV[3]
local limit, share = tonumber(ARGV[4]), tonumber(ARGV[5])
local busy = {}
for i = 6, #ARGV, 2 do busy[ARGV[i]] = tonumber(ARGV[i + 1]) end

-- Pending deliveries queued before the per-team sets move into them, once.
if redis.call('EXISTS', K.due_before_teams) == 1 then
  local old = redis.call('ZRANGE', K.due_before_teams, 0, -1, 'WITHSCORES')
  for i = 1, #old, 2 do
    local team = redis.call('HGET', K.delivery(old[i]), 'team')
    if team then
      redis.call('ZADD', K.due(team), 'NX', old[i + 1], old[i])
      redis.call('SADD', K.due_teams, team)
    end
  end
  redis.call('DEL', K.due_before_teams)
end

local candidates = {}
for _, team in ipairs(redis.call('SMEMBERS', K.due_teams)) do
  local left = math.min(share - (busy[team] or 0), limit)
  if left > 0 then
    local due = redis.call('ZRANGEBYSCORE', K.due(team), '-inf', now, 'WITHSCORES', 'LIMIT', 0, left)
    for i = 1, #due, 2 do
      candidates[#candidates + 1] = { at = tonumber(due[i + 1]), id = due[i], team = team }
    end
  end
end
-- Oldest due first across teams, as one sorted set would have them.
table.sort(candidates, function(a, b)
  if a.at ~= b.at then return a.at < b.at end
  return a.id < b.id
end)

local claimed = {}
for i = 1, math.min(limit, #candidates) do
  local id, team = candidates[i].id, candidates[i].team
  local key = K.delivery(id)
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'next_attempt_at', lease_until)
  redis.call('ZADD', K.due(team), lease_until, id)
  claimed[i] = redis.call('HMGET', key,
    'id', 'task_id', 'team', 'url', 'body', 'attempts', 'created_at', 'deadline')
end
return claimed
