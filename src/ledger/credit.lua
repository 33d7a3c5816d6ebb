-- credit: grants, purchases, refunds and adjustments, idempotent on an external id.
-- KEYS: 1 account hash, 2 shard usage stream, 3 idempotency mark (string with TTL)
-- ARGV: 1 account id, 2 kind, 3 to allowance (µc, may be negative), 4 to purchased (µc, may be
--       negative), 5 now (unix ms), 6 entry id, 7 mark ttl (s), 8 route, 9 action,
--       10 request id, 11 reason, 12 counted amount (µc, for usage stats; negative for refunds)
-- Reply: {0, allowance, purchased} applied; {1} account missing; {2, allowance, purchased}
--        already applied (duplicate)
local acct, stream, mark = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', acct) == 0 then return {1} end
if redis.call('SET', mark, ARGV[6], 'NX', 'EX', tonumber(ARGV[7])) == false then
  return {2, tonumber(redis.call('HGET', acct, 'allowance') or '0'), tonumber(redis.call('HGET', acct, 'purchased') or '0')}
end
local d_allow, d_purch = tonumber(ARGV[3]), tonumber(ARGV[4])
local allowance = redis.call('HINCRBY', acct, 'allowance', d_allow)
local purchased = redis.call('HINCRBY', acct, 'purchased', d_purch)
redis.call('XADD', stream, '*',
  'id', ARGV[6], 'acct', ARGV[1], 'kind', ARGV[2], 'amount', tonumber(ARGV[12]),
  'd_allow', d_allow, 'd_purch', d_purch, 'allow', allowance, 'purch', purchased,
  'route', ARGV[8], 'action', ARGV[9], 'req', ARGV[10], 'reason', ARGV[11], 'ts', tonumber(ARGV[5]))
return {0, allowance, purchased}
