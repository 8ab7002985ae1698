-- SaveNew. KEYS[5]: the shard's id counter. ARGV: gid, shard, create_ms, status,
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
local records, dup = read_branches(n, fields, false)
if dup then
  return 'UNIQUE_CONFLICT'
end
-- A gid already in the index had a transaction before (now expired): drop what is left
-- of its branch list. A branch list never exists without an index entry (the sweep
-- deletes them together), so a new gid needs no such check.
if redis.call('ZADD', KEYS[4], created, gid) == 0 then
  redis.call('DEL', KEYS[2])
end
-- ids are unique across shards (at most 1024 of them)
local id = redis.call('INCR', KEYS[5]) * 1024 + shard
fields[#fields + 1] = 'id'
fields[#fields + 1] = string.format('%d', id)
bulk('HSET', KEYS[1], fields)
if n > 0 then
  bulk('RPUSH', KEYS[2], records)
end
settle(gid, status, next_ms, expire_at)
return 'OK'
