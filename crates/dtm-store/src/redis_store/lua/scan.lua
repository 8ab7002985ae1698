-- One shard's part of a page of GET /all, newest first. KEYS: all zset (score = create
-- time ms). ARGV: transaction key prefix, max score (or +inf), gid after which to continue at
-- the max score (or ''), min score (or -inf), status filter, trans_type filter, limit,
-- budget (entries to examine at most).
-- Returns {done, last examined score, last examined gid, {score, gid, ...matches}}.
local gprefix = arg()
local max = arg()
local after = arg()
local min = arg()
local want_status = arg()
local want_type = arg()
local limit = tonumber(arg())
local budget = tonumber(arg())
local max_n = tonumber(max)
-- byte order, as Redis orders members of equal score (Lua's `<` follows the locale)
local function bytes_before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end
local out, examined, offset = {}, 0, 0
local last_score, last_gid = '', ''
while true do
  local chunk = redis.call('ZREVRANGEBYSCORE', KEYS[1], max, min, 'WITHSCORES', 'LIMIT', offset, 200)
  if #chunk == 0 then
    return {1, last_score, last_gid, out}
  end
  offset = offset + #chunk / 2
  for i = 1, #chunk, 2 do
    local gid, score = chunk[i], chunk[i + 1]
    -- equal scores come in descending gid order: skip those already paged
    if after == '' or tonumber(score) ~= max_n or bytes_before(gid, after) then
      examined = examined + 1
      last_score, last_gid = score, gid
      local f = redis.call('HMGET', gprefix .. gid, 'status', 'trans_type')
      if f[1] and (want_status == '' or f[1] == want_status)
        and (want_type == '' or f[2] == want_type) then
        out[#out + 1] = score
        out[#out + 1] = gid
      end
      if #out / 2 >= limit or examined >= budget then
        return {0, last_score, last_gid, out}
      end
    end
  end
end
