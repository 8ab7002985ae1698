-- Transaction scripts get KEYS = global hash, branch list, branch state hash, due zset,
-- all zset, expiring zset; all six share one hash tag (the shard), so one slot.

-- Forget index entries of finished transactions whose keys have expired (by the server's
-- clock, which also expires the keys).
local function prune()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 32)
  if #gone > 0 then
    redis.call('ZREM', KEYS[5], unpack(gone))
    redis.call('ZREM', KEYS[6], unpack(gone))
  end
end

-- After a change: a finished transaction leaves the due index and its keys expire at
-- expire_at (unix ms; '' keeps them); an unfinished one is due at next_ms (when given).
local function settle(gid, status, next_ms, expire_at)
  if is_final(status) then
    redis.call('ZREM', KEYS[4], gid)
    if expire_at ~= '' then
      for i = 1, 3 do
        redis.call('PEXPIREAT', KEYS[i], expire_at)
      end
      redis.call('ZADD', KEYS[6], expire_at, gid)
    end
  elseif next_ms ~= '' then
    redis.call('ZADD', KEYS[4], next_ms, gid)
  end
  prune()
end

-- Read n branches as (key, record, state) triples. Returns records, the flat
-- key/state list, and whether a key repeats (in the list or, with `states_key`, stored).
local function read_branches(n, states_key)
  local records, states, seen, dup = {}, {}, {}, false
  for i = 1, n do
    local key = arg()
    records[i] = arg()
    states[2 * i - 1] = key
    states[2 * i] = arg()
    if seen[key] or (states_key and redis.call('HEXISTS', states_key, key) == 1) then
      dup = true
    end
    seen[key] = true
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
