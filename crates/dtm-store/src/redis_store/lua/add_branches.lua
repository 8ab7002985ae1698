-- AddBranches. ARGV: expect_status, nbranches, (key, record, state)*
local expect = arg()
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status ~= expect then
  return 'NOT_FOUND'
end
local n = tonumber(arg())
local fields = {}
local records, dup = read_branches(n, fields, true)
if dup then
  return 'UNIQUE_CONFLICT'
end
if n > 0 then
  bulk('RPUSH', KEYS[2], records)
  bulk('HSET', KEYS[1], fields)
  -- a finished transaction's keys expire together
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
return 'OK'
