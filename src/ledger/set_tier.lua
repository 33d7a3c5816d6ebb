-- set_tier: a tier change takes effect at once: the allowance becomes the new tier's monthly
-- credits (journaled as a `subscription` entry with the difference); purchased is untouched.
-- KEYS: 1 account hash, 2 shard usage stream
-- ARGV: 1 account id, 2 tier, 3 monthly (µc, -1 unlimited), 4 now (ms), 5 entry id
-- Moving to the tier the account already has changes nothing (no refill of the allowance:
-- that happens only at the period boundary).
-- Reply: {0, allowance, purchased}; {1} missing
local acct, stream = KEYS[1], KEYS[2]
if redis.call('EXISTS', acct) == 0 then return {1} end
local allowance = tonumber(redis.call('HGET', acct, 'allowance') or '0')
local purchased = tonumber(redis.call('HGET', acct, 'purchased') or '0')
if redis.call('HGET', acct, 'tier') == ARGV[2] then return {0, allowance, purchased} end
local monthly = tonumber(ARGV[3])
local new_allowance = 0
if monthly >= 0 then new_allowance = monthly end
redis.call('HSET', acct, 'tier', ARGV[2], 'allowance', new_allowance)
redis.call('XADD', stream, '*', 'id', ARGV[5], 'acct', ARGV[1], 'kind', 'subscription',
  'amount', 0, 'd_allow', new_allowance - allowance, 'd_purch', 0,
  'allow', new_allowance, 'purch', purchased, 'tier', ARGV[2], 'ts', tonumber(ARGV[4]))
return {0, new_allowance, purchased}
