-- SaveNew. ARGV: gid, now, create_ms, status, next_ms|'', ttl, expire_at,
-- nfields, (field, value)*, nbranches, (key, record, state)*
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'UNIQUE_CONFLICT'
end
local gid = arg()
local now = arg()
local created = arg()
local status = arg()
local next_ms = arg()
local ttl = arg()
local expire_at = arg()
local fields = read_fields()
local n = tonumber(arg())
local records, states, dup = read_branches(n, nil)
if dup then
  return 'UNIQUE_CONFLICT'
end
-- leftovers of an expired transaction with the same gid
redis.call('DEL', KEYS[2], KEYS[3])
bulk('HSET', KEYS[1], fields)
if n > 0 then
  bulk('RPUSH', KEYS[2], records)
  bulk('HSET', KEYS[3], states)
end
redis.call('ZADD', KEYS[5], created, gid)
redis.call('ZREM', KEYS[6], gid)
settle(gid, status, next_ms, now, ttl, expire_at)
return 'OK'
