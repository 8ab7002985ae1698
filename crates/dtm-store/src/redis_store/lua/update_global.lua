-- UpdateGlobal. ARGV: gid, expect_status, check_owner (1|0), expect_owner,
-- new_status|'', next_ms|'', expire_at|'', nfields, (field, value)*, nupdates, (key, state)*
local gid = arg()
local expect = arg()
local check_owner = arg()
local owner = arg()
local new_status = arg()
local next_ms = arg()
local expire_at = arg()
local cur = redis.call('HMGET', KEYS[1], 'status', 'owner')
local status = cur[1]
if not status or status ~= expect then
  return 'NOT_FOUND'
end
if check_owner == '1' and (cur[2] or '') ~= owner then
  return 'NOT_FOUND'
end
local fields = read_fields()
local n = tonumber(arg())
if n > 0 then
  local keys, states = {}, {}
  for i = 1, n do
    keys[i] = 's:' .. arg()
    states[i] = arg()
  end
  -- like an SQL UPDATE: a branch that does not exist is not created
  local have = hmget(KEYS[1], keys)
  for i = 1, n do
    if have[i] then
      fields[#fields + 1] = keys[i]
      fields[#fields + 1] = states[i]
    end
  end
end
if #fields > 0 then
  bulk('HSET', KEYS[1], fields)
end
if new_status == '' then
  new_status = status
end
settle(gid, new_status, next_ms, expire_at)
return 'OK'
