-- ClaimDue on one shard. KEYS: due zset. ARGV: global key prefix, now, limit, lease, owner.
-- Returns the claimed globals as HGETALL arrays.
local gprefix = arg()
local now = arg()
local limit = arg()
local lease = arg()
local owner = arg()
local out = {}
for _, gid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
  local g = gprefix .. gid
  local status = redis.call('HGET', g, 'status')
  if not status or is_final(status) then
    -- not due work (cannot happen through dtm-rs writes; keep the index clean anyway)
    redis.call('ZREM', KEYS[1], gid)
  else
    redis.call('ZADD', KEYS[1], lease, gid)
    redis.call('HSET', g, 'owner', owner, 'next_cron_time', lease, 'update_time', now)
    out[#out + 1] = redis.call('HGETALL', g)
  end
end
return out
