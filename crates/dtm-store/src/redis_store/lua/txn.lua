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
