-- notice: a budget threshold's claim for a team and period, and the delivery of its notification,
-- are one step, so two replicas that both see the threshold reached queue one notification.
-- ARGV: prefix, team, period, percent, claim lifetime in ms or '' (kept), delivery id, its task
--       id (the claim's name), url, body, created at, deadline
local team, period, percent, lifetime = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local id, task_id, url, body, created, deadline = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10],
  ARGV[11]
-- The team is escaped as in a period key; period and percent have no ':' of their own.
local claim = P .. 'budget-notice:' .. escape(team) .. ':' .. period .. ':' .. percent
if not redis.call('SET', claim, id, 'NX') then return { 'claimed_before' } end
if queue_delivery(id, task_id, team, url, body, created, deadline) == 0 then
  redis.call('DEL', claim)
  return { 'conflict', 'delivery ' .. id .. ' or one for ' .. task_id .. ' is queued already' }
end
-- Redis forgets the claim once its period is long over, so claims stay bounded.
if lifetime ~= '' then redis.call('PEXPIRE', claim, math.max(1, tonumber(lifetime))) end
return { 'claimed' }
