-- Retention sweep of one shard: drop the index entries of transactions whose hash is gone
-- (expired), with whatever is left of their branch list (and of the branch state hash of
-- the layout before version 2). KEYS: all zset, sweep
-- cursor (the create-time score the next sweep starts at). ARGV: the shard's key tag,
-- created-before bound (ms), budget (entries to examine). Returns how many were dropped.
local tag = arg()
local before = arg()
local budget = tonumber(arg())
local from = redis.call('GET', KEYS[2]) or '-inf'
local chunk = redis.call('ZRANGEBYSCORE', KEYS[1], from, before, 'WITHSCORES', 'LIMIT', 0, budget)
local dropped = 0
for i = 1, #chunk, 2 do
  local gid = chunk[i]
  if redis.call('EXISTS', tag .. 't:' .. gid) == 0 then
    redis.call('ZREM', KEYS[1], gid)
    redis.call('DEL', tag .. 'b:' .. gid, tag .. 's:' .. gid)
    dropped = dropped + 1
  end
end
-- the expiry index of earlier versions is no longer kept (UNLINK: it may be large, and
-- Redis frees it in the background)
redis.call('UNLINK', tag .. 'exp')
if #chunk < budget * 2 then
  -- reached the bound: the next sweep starts from the oldest again
  redis.call('DEL', KEYS[2])
else
  local last = chunk[#chunk]
  if last == from then
    -- a whole budget of one score: move past it
    last = '(' .. last
  end
  redis.call('SET', KEYS[2], last)
end
return dropped
