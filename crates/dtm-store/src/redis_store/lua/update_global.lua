-- UpdateGlobal. ARGV: gid, expect_status, check_owner (1|0), expect_owner,
-- new_status|'', next_ms|'', expire_at|'', nupdates, then the hash's (field, value) pairs
-- to the end: first the `s:<key>` state of each updated branch, then the columns to set.
local n = tonumber(ARGV[8])
local ask = {'status', 'owner'}
for i = 1, n do
  ask[i + 2] = ARGV[7 + 2 * i]
end
local cur = hmget(KEYS[1], ask)
local status = cur[1]
if not status or status ~= ARGV[2] then
  return 'NOT_FOUND'
end
if ARGV[3] == '1' and (cur[2] or '') ~= ARGV[4] then
  return 'NOT_FOUND'
end
-- like an SQL UPDATE: a branch that does not exist is not created
local all = true
for i = 1, n do
  if not cur[i + 2] then
    all = false
  end
end
if all then
  bulk('HSET', KEYS[1], ARGV, 9)
else
  local fields = {}
  for i = 1, n do
    if cur[i + 2] then
      fields[#fields + 1] = ARGV[7 + 2 * i]
      fields[#fields + 1] = ARGV[8 + 2 * i]
    end
  end
  for i = 9 + 2 * n, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  bulk('HSET', KEYS[1], fields)
end
local new_status = ARGV[5]
if new_status == '' then
  new_status = status
end
settle(ARGV[1], new_status, ARGV[6], ARGV[7])
return 'OK'
