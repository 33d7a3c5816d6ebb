-- Shared by settle.lua and extend.lua: reading and writing a hold record.
-- Integers as exact text: Lua would print 10^15 as 1e+15, which HINCRBY refuses.
local function int(n) return string.format('%d', n) end

-- acct|held|from_allow|from_purch|unlimited|extensions|route|action|tier|request id
local function read_hold(data, charge_id)
  local rec = redis.call('HGET', data, charge_id)
  if not rec then return nil end
  local acct, held, fa, fp, unl, n, route, action, tier, req =
    string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  if not acct then return nil end
  return {acct = acct, held = tonumber(held), fa = tonumber(fa), fp = tonumber(fp),
    unl = unl == '1', n = tonumber(n), route = route, action = action, tier = tier, req = req}
end

local function write_hold(data, charge_id, h)
  local unl = 0
  if h.unl then unl = 1 end
  redis.call('HSET', data, charge_id, table.concat({h.acct, int(h.held), int(h.fa), int(h.fp),
    unl, h.n, h.route, h.action, h.tier, h.req}, '|'))
end

-- The allowance usable now: frozen (zero) for a past-due account after its grace deadline.
local function usable_allowance(acct, now_ms)
  local allowance = tonumber(redis.call('HGET', acct, 'allowance') or '0')
  if redis.call('HGET', acct, 'status') == 'past_due'
      and math.floor(now_ms / 1000) >= tonumber(redis.call('HGET', acct, 'grace_until') or '0') then
    return 0, allowance
  end
  return allowance, allowance
end
