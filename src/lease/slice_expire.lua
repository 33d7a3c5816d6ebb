-- slice_expire: gives an expired slice back to its account (its instance crashed, or lost
-- Redis, before returning it). What the instance served from it and never reported is
-- forgiven: at most its last batch window. A slice renewed meanwhile is left alone.
-- KEYS: 1 account hash, 2 shard usage stream, 3 shard slices zset, 4 shard slice amounts hash
-- ARGV: 1 member ("instance|account"), 2 account id, 3 now (unix ms)
-- Reply: the amount given back (µc; 0 when there was nothing to do)
local acct, stream, zs, sh = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member, id, now_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local expiry = tonumber(redis.call('ZSCORE', zs, member) or '-1')
if expiry < 0 or expiry > now_ms then return 0 end
local slice = tonumber(redis.call('HGET', sh, member) or '0')
redis.call('ZREM', zs, member)
redis.call('HDEL', sh, member)
if slice <= 0 or redis.call('EXISTS', acct) == 0 then return 0 end
local f = redis.call('HMGET', acct, 'leased', 'allowance', 'purchased', 'tier')
local leased = math.max(tonumber(f[1] or '0') - slice, 0)
redis.call('HSET', acct, 'leased', string.format('%d', leased))
redis.call('XADD', stream, '*', 'id', 'lease:' .. member .. ':' .. ARGV[3] .. ':expired',
  'acct', id, 'kind', 'lease', 'amount', string.format('%d', -slice), 'd_allow', 0, 'd_purch', 0,
  'allow', f[2] or '0', 'purch', f[3] or '0', 'tier', f[4] or '', 'reason', 'expired', 'ts', ARGV[3])
return slice
