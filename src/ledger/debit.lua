-- debit: the hot path, one call per metered request, atomic on one hash slot.
-- KEYS: 1 account hash, 2 shard usage stream, 3 account lease zset, 4 shard holds zset,
--       5 shard hold records hash (4 and 5 are used only when ARGV[17] asks for a hold),
--       6 the account's lease zset for this action (used only when ARGV[23] > 0)
-- ARGV: 1 account id, 2 expected tier, 3 monthly credits (µc, -1 = unlimited), 4 cost (µc),
--       5 now (unix ms), 6 request id, 7 route, 8 action,
--       9 requests/hour, 10 requests/month, 11 action/hour, 12 action/month (0 = no limit),
--       13 max concurrent (0 = no limit), 14 lease ttl (ms), 15 charge id (unique per debit,
--       minted by tollgate: the journal entry ids and the lease member derive from it, never
--       from the client-supplied request id, which a client may repeat)
--       17 hold ttl (ms; 0 = a plain debit, no hold): the amount taken is held for
--          settle.lua, and settled at itself by whichever instance finds the hold expired
--       18 wanted (µc; holds only): take up to this much when the balance has it, but at
--          least ARGV[4] (which alone decides admission); -1 = all that is available
--       19 tokens per period (0 = no limit; counted by settle.lua as `tok_p`)
--       20 resource this request counts ('' = none), 21 its delta, 22 the tier's limit on it
--          (-1 = unlimited)
--       23 requests of this action in flight (0 = no limit)
-- Reply: {0, from_allowance, from_purchased, allowance_after, purchased_after, period_end,
--         taken (µc: the amount debited and journaled; nominal on unlimited tiers)}
--        {1}                                 account not in Redis: hydrate and retry
--        {2, allowance, purchased, leased}   insufficient credits (leased: reserved by
--                                            credit slices; recalling them may free it)
--        {3, quota_name, limit, retry_after_s}
--        {4, limit}                          too many requests in flight
--        {5, status}                         account not active (past_due is served: until
--                                            its grace deadline as usual, then with the
--                                            allowance frozen, reported as 0)
--        {6, tier}                           tier differs from the caller's cached one
--        {8, resource, limit}                the resource is at the tier's limit
--        {7}                                 ran after ARGV[16], the caller's deadline in
--                                            Redis's clock (unix ms; 0 = none): the caller
--                                            has given up waiting, so nothing is charged
local acct, stream, leases = KEYS[1], KEYS[2], KEYS[3]
local account_id, tier = ARGV[1], ARGV[2]
local monthly, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local now_ms = tonumber(ARGV[5])
local now_s = math.floor(now_ms / 1000)
local req_id, route, action = ARGV[6], ARGV[7], ARGV[8]
local per_hour, per_month = tonumber(ARGV[9]), tonumber(ARGV[10])
local act_hour, act_month = tonumber(ARGV[11]), tonumber(ARGV[12])
local max_conc, lease_ttl = tonumber(ARGV[13]), tonumber(ARGV[14])
local charge_id = ARGV[15]
local deadline = tonumber(ARGV[16] or '0')
local hold_ttl = tonumber(ARGV[17] or '0')
-- Integers as exact text: Lua would print 10^15 as 1e+15, which HINCRBY refuses.
local function int(n) return string.format('%d', n) end
local wanted = tonumber(ARGV[18] or '0')
local tok_limit = tonumber(ARGV[19] or '0')
local resource, r_delta, r_limit = ARGV[20] or '', tonumber(ARGV[21] or '0'), tonumber(ARGV[22] or '-1')
local act_conc = tonumber(ARGV[23] or '0')
local rk = 'r:' .. resource

-- A call that waited in a busy Redis past the caller's timeout must not charge: the caller
-- has already answered 503 (or forwarded unmetered) and will never refund it.
if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline then return {7} end
end

-- Every field the checks need, in one call (the hash exists iff it has a tier).
local ak = 'a:' .. action
local function read()
  return redis.call('HMGET', acct, 'tier', 'status', 'grace_until', 'period_end', 'req_h_idx',
    'req_h', 'req_p', ak .. ':hidx', ak .. ':h', ak .. ':p', 'allowance', 'purchased', 'tok_p', rk, 'leased')
end
local f = read()
local cur_tier = f[1]
if not cur_tier then return {1} end
if cur_tier ~= tier then return {6, cur_tier} end
local status = f[2] or 'active'
-- Past due (a failed subscription invoice): served as usual until the grace deadline; after
-- it the allowance is frozen and only purchased credits pay, until an invoice is paid.
local frozen = false
if status == 'past_due' then
  frozen = now_s >= tonumber(f[3] or '0')
elseif status ~= 'active' then
  return {5, status}
end

if now_s >= tonumber(f[4] or '0') then
  roll_period(acct, stream, account_id, monthly, now_s, now_ms, charge_id)
  f = read()
end
local period_end = tonumber(f[4])

-- Quotas: fixed windows, the hour on the clock and the billing period.
local hour = math.floor(now_s / 3600)
local until_hour = (hour + 1) * 3600 - now_s
local req_h = 0
if tonumber(f[5] or '-1') == hour then req_h = tonumber(f[6] or '0') end
if per_hour > 0 and req_h >= per_hour then return {3, 'requests_per_hour', per_hour, until_hour} end
local req_p = tonumber(f[7] or '0')
if per_month > 0 and req_p >= per_month then return {3, 'requests_per_month', per_month, period_end - now_s} end
local a_h = 0
if tonumber(f[8] or '-1') == hour then a_h = tonumber(f[9] or '0') end
if act_hour > 0 and a_h >= act_hour then return {3, 'action_per_hour:' .. action, act_hour, until_hour} end
local a_p = tonumber(f[10] or '0')
if act_month > 0 and a_p >= act_month then return {3, 'action_per_month:' .. action, act_month, period_end - now_s} end
if tok_limit > 0 and tonumber(f[13] or '0') >= tok_limit then return {3, 'tokens_per_month', tok_limit, period_end - now_s} end
local r_count = tonumber(f[14] or '0')
if resource ~= '' and r_delta > 0 and r_limit >= 0 and r_count + r_delta > r_limit then
  return {8, resource, r_limit}
end

-- Concurrency: leases that expire on their own, so a crashed instance cannot leak a slot.
if max_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
  if redis.call('ZCARD', leases) >= max_conc then return {4, max_conc} end
end
if act_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[6]) >= act_conc then return {4, act_conc} end
end

-- Balance: allowance first, then purchased.
local allowance = tonumber(f[11] or '0')
local purchased = tonumber(f[12] or '0')
local from_allow, from_purch = 0, 0
-- A frozen allowance counts as zero (also on unlimited tiers); replies report it so.
local usable = allowance
if frozen then usable = 0 end
local take = cost
if monthly >= 0 or frozen then
  -- Money reserved for other instances' credit slices (slice.lua) is not free to take.
  local leased = tonumber(f[15] or '0')
  if usable + purchased - leased < cost then return {2, usable, purchased, leased} end
  if hold_ttl > 0 then
    local avail = math.max(usable + purchased - leased, cost)
    if wanted < 0 then take = avail elseif wanted > cost then take = math.min(wanted, avail) end
  end
  from_allow = math.min(math.max(usable, 0), take)
  from_purch = take - from_allow
  allowance = allowance - from_allow
  purchased = purchased - from_purch
end

-- One write for the buckets and the counters (the script is atomic: the values read above are
-- still current).
redis.call('HSET', acct, 'allowance', int(allowance), 'purchased', int(purchased),
  'req_h', req_h + 1, 'req_h_idx', hour, 'req_p', req_p + 1,
  ak .. ':h', a_h + 1, ak .. ':hidx', hour, ak .. ':p', a_p + 1)
if resource ~= '' then
  redis.call('HSET', acct, rk, int(math.max(r_count + r_delta, 0)))
end
if max_conc > 0 then
  redis.call('ZADD', leases, now_ms + lease_ttl, charge_id)
  redis.call('PEXPIRE', leases, lease_ttl)
end
if act_conc > 0 then
  redis.call('ZADD', KEYS[6], now_ms + lease_ttl, charge_id)
  redis.call('PEXPIRE', KEYS[6], lease_ttl)
end
if hold_ttl > 0 then
  -- acct|held|from_allow|from_purch|unlimited|extensions|route|action|tier|request id (last:
  -- the only part that may contain '|')
  local unl = 0
  if monthly < 0 and not frozen then unl = 1 end
  redis.call('HSET', KEYS[5], charge_id, table.concat({account_id, int(take), int(from_allow),
    int(from_purch), unl, 0, route, action, tier, req_id}, '|'))
  redis.call('ZADD', KEYS[4], now_ms + hold_ttl, charge_id)
end
redis.call('XADD', stream, '*',
  'id', charge_id .. ':debit', 'acct', account_id, 'kind', 'debit', 'amount', int(take),
  'd_allow', int(-from_allow), 'd_purch', int(-from_purch), 'allow', int(allowance), 'purch', int(purchased),
  'route', route, 'action', action, 'req', req_id, 'tier', tier, 'ts', now_ms)
if frozen then allowance = 0 end
return {0, from_allow, from_purch, allowance, purchased, period_end, take}
