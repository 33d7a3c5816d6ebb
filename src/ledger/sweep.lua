-- sweep: the expired holds of one shard (their instance crashed or lost Redis before
-- settling). Read-only: each one is then settled at what it holds by settle.lua, which
-- removes it atomically, so instances sweeping the same shard never settle one twice.
-- KEYS: 1 shard holds zset, 2 shard hold records hash
-- ARGV: 1 now (ms), 2 max holds to return
-- Reply: flat list {charge id, account id, action, ...}; a hold without a record is removed
-- here.
local holds, data = KEYS[1], KEYS[2]
local ids = redis.call('ZRANGEBYSCORE', holds, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local rec = redis.call('HGET', data, id)
  if rec then
    local acct, action = string.match(rec, '^([^|]*)|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|([^|]*)|')
    out[#out + 1] = id
    out[#out + 1] = acct or ''
    out[#out + 1] = action or ''
  else
    redis.call('ZREM', holds, id)
  end
end
return out
