-- Layout 2 migration of one shard: versions before it kept each transaction's branch
-- states in a hash of their own (s:<gid>) beside the global hash (g:<gid>); now they are
-- fields `s:<branch key>` of the transaction hash t:<gid> (see txn.lua). The branch list
-- (b:<gid>) stays. RENAME keeps the expiry. KEYS: all zset. ARGV: the shard's key tag,
-- first rank, count. Returns {index entries examined, transactions converted}.
local tag = arg()
local first = tonumber(arg())
local count = tonumber(arg())
local gids = redis.call('ZRANGE', KEYS[1], first, first + count - 1)
local converted = 0
for _, gid in ipairs(gids) do
  local g, s = tag .. 'g:' .. gid, tag .. 's:' .. gid
  if redis.call('EXISTS', g) == 1 then
    local states = redis.call('HGETALL', s)
    local fields = {}
    for i = 1, #states, 2 do
      fields[#fields + 1] = 's:' .. states[i]
      fields[#fields + 1] = states[i + 1]
    end
    if #fields > 0 then
      bulk('HSET', g, fields)
    end
    redis.call('RENAME', g, tag .. 't:' .. gid)
    redis.call('DEL', s)
    converted = converted + 1
  end
end
return {#gids, converted}
