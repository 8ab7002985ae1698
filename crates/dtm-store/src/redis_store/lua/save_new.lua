-- SaveNew. KEYS[7]: the shard's id counter. ARGV: gid, shard, create_ms, status,
-- next_ms|'', expire_at|'', nfields, (field, value)*, nbranches, (key, record, state)*
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'UNIQUE_CONFLICT'
end
local gid = arg()
local shard = tonumber(arg())
local created = arg()
local status = arg()
local next_ms = arg()
local expire_at = arg()
local fields = read_fields()
local n = tonumber(arg())
local records, states, dup = read_branches(n, nil)
if dup then
  return 'UNIQUE_CONFLICT'
end
-- leftovers of an expired transaction with the same gid
redis.call('DEL', KEYS[2], KEYS[3])
-- ids are unique across shards (at most 1024 of them)
local id = redis.call('INCR', KEYS[7]) * 1024 + shard
redis.call('HSET', KEYS[1], 'id', string.format('%d', id))
bulk('HSET', KEYS[1], fields)
if n > 0 then
  bulk('RPUSH', KEYS[2], records)
  bulk('HSET', KEYS[3], states)
end
redis.call('ZADD', KEYS[5], created, gid)
redis.call('ZREM', KEYS[6], gid)
settle(gid, status, next_ms, expire_at)
return 'OK'
