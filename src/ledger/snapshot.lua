-- snapshot: an account's buckets and its journal entries still in the shard stream, read
-- atomically (one slot), for the audit, the rebuild and the hydration. The stream is read
-- even when the account hash is absent: a hydration must count what is still unflushed.
-- KEYS: 1 account hash, 2 shard usage stream
-- ARGV: 1 account id
-- Reply: {exists (0/1), allowance, purchased, {entry_id, d_allow, d_purch, ...}}
local acct, stream = KEYS[1], KEYS[2]
local exists = redis.call('EXISTS', acct)
local allowance, purchased = 0, 0
if exists == 1 then
  allowance = tonumber(redis.call('HGET', acct, 'allowance') or '0')
  purchased = tonumber(redis.call('HGET', acct, 'purchased') or '0')
end
local pending = {}
local entries = redis.call('XRANGE', stream, '-', '+')
for _, e in ipairs(entries) do
  local f = e[2]
  local id, who, da, dp = nil, nil, 0, 0
  for i = 1, #f, 2 do
    local k, v = f[i], f[i + 1]
    if k == 'id' then id = v
    elseif k == 'acct' then who = v
    elseif k == 'd_allow' then da = tonumber(v) or 0
    elseif k == 'd_purch' then dp = tonumber(v) or 0 end
  end
  if who == ARGV[1] and id then
    table.insert(pending, id)
    table.insert(pending, da)
    table.insert(pending, dp)
  end
end
return {exists, allowance, purchased, pending}
