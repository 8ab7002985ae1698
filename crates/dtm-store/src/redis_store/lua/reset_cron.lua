-- ResetCronTime on one shard. KEYS: due zset. ARGV: transaction key prefix, after, now, limit.
-- Returns {count, 1 when more than limit were scheduled after `after`}.
local gprefix = arg()
local after = arg()
local now = arg()
local limit = tonumber(arg())
local gids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. after, '+inf', 'LIMIT', 0, limit + 1)
local n = 0
for i, gid in ipairs(gids) do
  if i > limit then
    break
  end
  redis.call('ZADD', KEYS[1], now, gid)
  redis.call('HSET', gprefix .. gid, 'next_cron_time', now, 'update_time', now)
  n = n + 1
end
if #gids > limit then
  return {n, 1}
end
return {n, 0}
