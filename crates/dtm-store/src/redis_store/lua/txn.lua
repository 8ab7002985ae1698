-- Transaction scripts get KEYS = transaction hash, branch list, due zset, all zset; all
-- four share one hash tag (the shard), so one slot. The transaction hash holds the
-- global's columns and, under `s:<branch key>`, each branch's changing state; the branch
-- list holds the immutable branch records in insertion order. Index entries of expired
-- transactions are dropped by the retention sweep (sweep.lua), not here.

-- After a change: a finished transaction leaves the due index and its keys expire at
-- expire_at (unix ms; '' keeps them); an unfinished one is due at next_ms (when given).
local function settle(gid, status, next_ms, expire_at)
  if is_final(status) then
    redis.call('ZREM', KEYS[3], gid)
    if expire_at ~= '' then
      redis.call('PEXPIREAT', KEYS[1], expire_at)
      redis.call('PEXPIREAT', KEYS[2], expire_at)
    end
  elseif next_ms ~= '' then
    redis.call('ZADD', KEYS[3], next_ms, gid)
  end
end

-- Read n branches as (key, record, state) triples: the records are returned, the states
-- appended to `fields` as `s:<key>` -> state. Also returns whether a key repeats, in the
-- list or (with `check`) among the stored branches.
local function read_branches(n, fields, check)
  local records, keys, seen, dup = {}, {}, {}, false
  for i = 1, n do
    local key = 's:' .. arg()
    records[i] = arg()
    fields[#fields + 1] = key
    fields[#fields + 1] = arg()
    keys[i] = key
    if seen[key] then
      dup = true
    end
    seen[key] = true
  end
  if check and not dup and n > 0 then
    local stored = hmget(KEYS[1], keys)
    for i = 1, n do
      if stored[i] then
        dup = true
      end
    end
  end
  return records, dup
end
