-- KV scripts. KEYS: values hash, ids zset, id counter; all tagged by the category.
-- A value is stored as `id|version|create_ms|update_ms|v`.
local op = arg()
local k = arg()
if op == 'create' then
  local v = arg()
  local now = arg()
  if redis.call('HEXISTS', KEYS[1], k) == 1 then
    return 'UNIQUE_CONFLICT'
  end
  local id = redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[1], k, id .. '|1|' .. now .. '|' .. now .. '|' .. v)
  redis.call('ZADD', KEYS[2], id, k)
  return 'OK'
elseif op == 'update' then
  local v = arg()
  local version = arg()
  local now = arg()
  local cur = redis.call('HGET', KEYS[1], k)
  if not cur then
    return 'NOT_FOUND'
  end
  local id, ver, created = string.match(cur, '^(%d+)|(%d+)|(%d*)|')
  if ver ~= version then
    return 'NOT_FOUND'
  end
  redis.call('HSET', KEYS[1], k,
    id .. '|' .. (tonumber(ver) + 1) .. '|' .. created .. '|' .. now .. '|' .. v)
  return 'OK'
elseif op == 'delete' then
  if redis.call('HDEL', KEYS[1], k) == 0 then
    return 'NOT_FOUND'
  end
  redis.call('ZREM', KEYS[2], k)
  return 'OK'
end
return redis.error_reply('unknown kv op ' .. tostring(op))
