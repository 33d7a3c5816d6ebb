-- settle: ends a hold with the request's true cost. Refunds the difference (to purchased
-- first, as far as the hold took from it, then to the allowance) or charges the extra
-- (allowance first, then purchased, which may go below zero: the true cost is always
-- recorded, and an account in debt gets 402 until a top-up pays the debt). Journals one
-- `settle` entry with the measured usage. Exactly once per hold: whoever removes it wins.
-- KEYS: 1 account hash, 2 shard usage stream, 3 shard holds zset, 4 shard hold records hash,
--       5 account lease zset, 6 the account's lease zset for the request's action
-- ARGV: 1 charge id, 2 true cost (µc; ignored when ARGV[9] = "1"), 3 now (ms),
--       4 tokens in, 5 tokens out, 6 upstream status, 7 duration (ms), 8 reason,
--       9 "1" = settle at what is held (an expired hold: its true cost is unknown)
-- Reply: {0, delta, d_allowance, d_purchased, allowance_after, purchased_after}
--        {1}  no such hold (already settled, by this or another instance)
--        {2}  the account is gone from Redis: the hold is dropped, nothing can be applied
local acct, stream, holds, data, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local charge_id, now_ms = ARGV[1], tonumber(ARGV[3])
local h = read_hold(data, charge_id)
if not h then
  redis.call('ZREM', holds, charge_id)
  return {1}
end
redis.call('HDEL', data, charge_id)
redis.call('ZREM', holds, charge_id)
redis.call('ZREM', leases, charge_id)
redis.call('ZREM', KEYS[6], charge_id)
if redis.call('EXISTS', acct) == 0 then return {2} end
-- Tokens count against the tier's tokens_per_month.
local tokens = (tonumber(ARGV[4]) or 0) + (tonumber(ARGV[5]) or 0)
if tokens > 0 then redis.call('HINCRBY', acct, 'tok_p', int(tokens)) end

local cost = tonumber(ARGV[2])
if ARGV[9] == '1' then cost = h.held end
local delta = cost - h.held
local d_allow, d_purch = 0, 0
if not h.unl then
  if delta < 0 then
    local back = -delta
    d_purch = math.min(back, h.fp)
    d_allow = back - d_purch
  elseif delta > 0 then
    local usable = usable_allowance(acct, now_ms)
    d_allow = -math.min(math.max(usable, 0), delta)
    d_purch = -(delta + d_allow)
  end
end
if d_allow ~= 0 then redis.call('HINCRBY', acct, 'allowance', int(d_allow)) end
if d_purch ~= 0 then redis.call('HINCRBY', acct, 'purchased', int(d_purch)) end
local allowance = tonumber(redis.call('HGET', acct, 'allowance') or '0')
local purchased = tonumber(redis.call('HGET', acct, 'purchased') or '0')
redis.call('XADD', stream, '*',
  'id', charge_id .. ':settle', 'acct', h.acct, 'kind', 'settle', 'amount', int(delta),
  'd_allow', int(d_allow), 'd_purch', int(d_purch), 'allow', int(allowance),
  'purch', int(purchased), 'route', h.route, 'action', h.action, 'req', h.req, 'tier', h.tier,
  'tok_in', ARGV[4], 'tok_out', ARGV[5], 'status', ARGV[6], 'dur', ARGV[7], 'reason', ARGV[8],
  'ts', ARGV[3])
return {0, delta, d_allow, d_purch, allowance, purchased}
