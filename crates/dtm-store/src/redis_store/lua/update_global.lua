-- UpdateGlobal. ARGV: gid, expect_status, check_owner (1|0), expect_owner,
-- new_status|'', next_ms|'', expire_at|'', nfields, (field, value)*, nupdates, (key, state)*
local gid = arg()
local expect = arg()
local check_owner = arg()
local owner = arg()
local new_status = arg()
local next_ms = arg()
local expire_at = arg()
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status ~= expect then
  return 'NOT_FOUND'
end
if check_owner == '1' and (redis.call('HGET', KEYS[1], 'owner') or '') ~= owner then
  return 'NOT_FOUND'
end
local fields = read_fields()
if #fields > 0 then
  bulk('HSET', KEYS[1], fields)
end
for _ = 1, tonumber(arg()) do
  local key = arg()
  local state = arg()
  -- like an SQL UPDATE: a branch that does not exist is not created
  if redis.call('HEXISTS', KEYS[3], key) == 1 then
    redis.call('HSET', KEYS[3], key, state)
  end
end
if new_status == '' then
  new_status = status
end
settle(gid, new_status, next_ms, expire_at)
return 'OK'
