-- Helpers shared by the dtm-rs scripts. Arguments are read in order with arg().
local argi = 0
local function arg()
  argi = argi + 1
  return ARGV[argi]
end

-- The arguments not read yet, as a list.
local function rest()
  local out = {}
  for i = argi + 1, #ARGV do
    out[#out + 1] = ARGV[i]
  end
  argi = #ARGV
  return out
end

local function is_final(status)
  return status == 'succeed' or status == 'failed'
end

-- `cmd key [k v] list[from..to]` (the whole list by default), in chunks of 1000 (unpack
-- has a stack limit; chunks of an even size keep field/value pairs whole); the optional
-- pair `k v` goes first, in the first chunk.
local function bulk(cmd, key, list, from, to, k, v)
  local i = from or 1
  to = to or #list
  if k then
    local last = math.min(i + 999, to)
    redis.call(cmd, key, k, v, unpack(list, i, last))
    i = last + 1
  end
  while i <= to do
    local last = math.min(i + 999, to)
    redis.call(cmd, key, unpack(list, i, last))
    i = last + 1
  end
end

-- HMGET over a long list of fields, in chunks; one answer (or false) per field.
local function hmget(key, fields)
  local out = {}
  for i = 1, #fields, 1000 do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + 999, #fields)))
    for j = 1, #part do
      out[#out + 1] = part[j]
    end
  end
  return out
end
