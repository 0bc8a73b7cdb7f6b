-- move: release, unknown outcome and an admin's release of an unknown outcome; the state check
-- and the change of the period's totals are one step, so nothing is given back twice.
-- ARGV: prefix, reservation id, from state, to state, charge ('1' or ''), reason or ''
local refused = move_reservation(ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1', ARGV[6])
if refused then return { 'conflict', refused } end
return { 'ok' }
