-- Helpers shared by the dtm-rs scripts. Arguments are read in order with arg().
local argi = 0
local function arg()
  argi = argi + 1
  return ARGV[argi]
end

local function is_final(status)
  return status == 'succeed' or status == 'failed'
end

-- `cmd key item...` over a long list, in chunks (unpack has a stack limit).
local function bulk(cmd, key, list)
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end
