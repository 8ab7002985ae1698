-- AddBranches. ARGV: expect_status, nbranches, (key, record, state)*
local expect = arg()
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status ~= expect then
  return 'NOT_FOUND'
end
local n = tonumber(arg())
if n == 0 then
  return 'OK'
end
-- the records for the list; the states as `s:<key>` fields of the hash
local records, fields, keys, seen = {}, {}, {}, {}
for i = 1, n do
  local key = 's:' .. arg()
  if seen[key] then
    return 'UNIQUE_CONFLICT'
  end
  seen[key] = true
  keys[i] = key
  records[i] = arg()
  fields[2 * i - 1] = key
  fields[2 * i] = arg()
end
for _, stored in ipairs(hmget(KEYS[1], keys)) do
  if stored then
    return 'UNIQUE_CONFLICT'
  end
end
bulk('RPUSH', KEYS[2], records)
bulk('HSET', KEYS[1], fields)
-- a finished transaction's keys expire together
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 'OK'
