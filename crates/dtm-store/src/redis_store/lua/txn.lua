-- Transaction scripts get KEYS = global hash, branch list, branch state hash, due zset,
-- all zset; all five share one hash tag (the shard), so one slot. Index entries of
-- expired transactions are dropped by the retention sweep (sweep.lua), not here.

-- After a change: a finished transaction leaves the due index and its keys expire at
-- expire_at (unix ms; '' keeps them); an unfinished one is due at next_ms (when given).
local function settle(gid, status, next_ms, expire_at)
  if is_final(status) then
    redis.call('ZREM', KEYS[4], gid)
    if expire_at ~= '' then
      for i = 1, 3 do
        redis.call('PEXPIREAT', KEYS[i], expire_at)
      end
    end
  elseif next_ms ~= '' then
    redis.call('ZADD', KEYS[4], next_ms, gid)
  end
end

-- Read n branches as (key, record, state) triples. Returns records, the flat
-- key/state list, and whether a key repeats (in the list or, with `states_key`, stored).
local function read_branches(n, states_key)
  local records, states, keys, seen, dup = {}, {}, {}, {}, false
  for i = 1, n do
    local key = arg()
    records[i] = arg()
    states[2 * i - 1] = key
    states[2 * i] = arg()
    keys[i] = key
    if seen[key] then
      dup = true
    end
    seen[key] = true
  end
  if states_key and not dup then
    local stored = hmget(states_key, keys)
    for i = 1, n do
      if stored[i] then
        dup = true
      end
    end
  end
  return records, states, dup
end

local function read_fields()
  local fields = {}
  for i = 1, tonumber(arg()) * 2 do
    fields[i] = arg()
  end
  return fields
end
