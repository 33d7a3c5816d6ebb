-- snapshot: an account's buckets and its journal entries still in the shard stream, read
-- atomically (one slot), for the audit and the rebuild.
-- KEYS: 1 account hash, 2 shard usage stream
-- ARGV: 1 account id
-- Reply: {exists (0/1), allowance, purchased, {entry_id, d_allow, d_purch, ...}}
local acct, stream = KEYS[1], KEYS[2]
if redis.call('EXISTS', acct) == 0 then return {0, 0, 0, {}} end
local allowance = tonumber(redis.call('HGET', acct, 'allowance') or '0')
local purchased = tonumber(redis.call('HGET', acct, 'purchased') or '0')
local pending = {}
local entries = redis.call('XRANGE', stream, '-', '+')
for _, e in ipairs(entries) do
  local f = e[2]
  local id, who, da, dp = nil, nil, 0, 0
  for i = 1, #f, 2 do
    local k, v = f[i], f[i + 1]
    if k == 'id' then id = v
    elseif k == 'acct' then who = v
    elseif k == 'd_allow' then da = tonumber(v)
    elseif k == 'd_purch' then dp = tonumber(v) end
  end
  if who == ARGV[1] and id then
    table.insert(pending, id)
    table.insert(pending, da)
    table.insert(pending, dp)
  end
end
return {1, allowance, purchased, pending}
