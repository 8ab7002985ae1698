-- SaveNew. KEYS[5]: the shard's id counter. ARGV: gid, shard, create_ms, status,
-- next_ms|'', expire_at|'', nrecords, record*, then the hash's (field, value) pairs to
-- the end: the global's columns and each branch's `s:<key>` state. The client has
-- checked the branch keys for repeats. The runs go to RPUSH and HSET as they are.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'UNIQUE_CONFLICT'
end
local gid = ARGV[1]
local n = tonumber(ARGV[7])
-- ids are unique across shards (at most 1024 of them)
local id = string.format('%d', redis.call('INCR', KEYS[5]) * 1024 + tonumber(ARGV[2]))
bulk('HSET', KEYS[1], ARGV, 8 + n, #ARGV, 'id', id)
-- A gid already in the index had a transaction before (now expired): drop what is left
-- of its branch list. A branch list never exists without an index entry (the sweep
-- deletes them together), so a new gid needs no such check.
if redis.call('ZADD', KEYS[4], ARGV[3], gid) == 0 then
  redis.call('DEL', KEYS[2])
end
bulk('RPUSH', KEYS[2], ARGV, 8, 7 + n)
settle(gid, ARGV[4], ARGV[5], ARGV[6])
return 'OK'
