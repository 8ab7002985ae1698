-- ResetNextCronTime. KEYS: transaction hash, due zset. ARGV: gid, now
local gid = arg()
local now = arg()
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'NOT_FOUND'
end
redis.call('HSET', KEYS[1], 'next_cron_time', now, 'update_time', now)
if not is_final(status) then
  redis.call('ZADD', KEYS[2], now, gid)
end
return 'OK'
