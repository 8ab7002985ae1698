-- ClaimDue on one shard. KEYS: due zset. ARGV: transaction key prefix, now, limit, lease,
-- owner, the global's field names. Returns the claimed globals as (field, value) arrays.
local gprefix = arg()
local now = arg()
local limit = arg()
local lease = arg()
local owner = arg()
local names = rest()
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
    local values = redis.call('HMGET', g, unpack(names))
    local row = {}
    for i = 1, #names do
      if values[i] then
        row[#row + 1] = names[i]
        row[#row + 1] = values[i]
      end
    end
    out[#out + 1] = row
  end
end
return out
