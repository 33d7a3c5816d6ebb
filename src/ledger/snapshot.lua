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
local function add(id, who, da, dp)
  if who == ARGV[1] and id then
    table.insert(pending, id)
    table.insert(pending, da)
    table.insert(pending, dp)
  end
end
-- A packed entry (field `rows`, src/journal/entry.rs): rows joined by "\n", each
-- id|acct|kind|amount|d_allow|d_purch|... ; only the first six parts are needed here.
local function add_packed(rows)
  for row in string.gmatch(rows, '[^\n]+') do
    local parts, pos = {}, 1
    for i = 1, 6 do
      local bar = string.find(row, '|', pos, true)
      if not bar then break end
      parts[i] = string.sub(row, pos, bar - 1)
      pos = bar + 1
    end
    if parts[6] then
      add(parts[1], parts[2], tonumber(parts[5]) or 0, tonumber(parts[6]) or 0)
    end
  end
end
local entries = redis.call('XRANGE', stream, '-', '+')
for _, e in ipairs(entries) do
  local f = e[2]
  local id, who, da, dp, rows = nil, nil, 0, 0, nil
  for i = 1, #f, 2 do
    local k, v = f[i], f[i + 1]
    if k == 'id' then id = v
    elseif k == 'acct' then who = v
    elseif k == 'd_allow' then da = tonumber(v) or 0
    elseif k == 'd_purch' then dp = tonumber(v) or 0
    elseif k == 'rows' then rows = v end
  end
  if rows then add_packed(rows) else add(id, who, da, dp) end
end
return {exists, allowance, purchased, pending}
