-- credit: grants, purchases, refunds and adjustments, idempotent on an external id.
-- KEYS: 1 account hash, 2 shard usage stream, 3 idempotency mark (string with TTL)
-- ARGV: 1 account id, 2 kind, 3 to allowance (µc, may be negative), 4 to purchased (µc, may be
--       negative), 5 now (unix ms), 6 entry id, 7 mark ttl (s), 8 route, 9 action,
--       10 request id, 11 reason, 12 counted amount (µc, for usage stats; negative for refunds)
-- Reply: {0, allowance, purchased} applied; {1} account missing; {2, allowance, purchased}
--        already applied (duplicate); an error reply when a bucket would leave the range
--        where amounts stay exact (|µc| < 2^53), with nothing written.
--
-- A failing redis.call aborts the script but keeps what was already written, so everything
-- that can fail comes before the first write, and the idempotency mark is written only
-- together with the credit it guards: a failed credit can be retried, a done one never twice.
local acct, stream, mark = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', acct) == 0 then return {1} end
local allowance = tonumber(redis.call('HGET', acct, 'allowance') or '0')
local purchased = tonumber(redis.call('HGET', acct, 'purchased') or '0')
if redis.call('EXISTS', mark) == 1 then return {2, allowance, purchased} end
local d_allow, d_purch = tonumber(ARGV[3]), tonumber(ARGV[4])
local limit = 9007199254740991
if d_allow == nil or d_purch == nil or math.abs(allowance + d_allow) > limit
    or math.abs(purchased + d_purch) > limit then
  return redis.error_reply('credit out of range: the balance would exceed the exact range')
end
-- The deltas go to HINCRBY as the caller's integer text (a Lua number could be formatted as
-- 1e+18, which HINCRBY refuses).
if d_allow ~= 0 then allowance = redis.call('HINCRBY', acct, 'allowance', ARGV[3]) end
if d_purch ~= 0 then purchased = redis.call('HINCRBY', acct, 'purchased', ARGV[4]) end
redis.call('SET', mark, ARGV[6], 'EX', tonumber(ARGV[7]))
redis.call('XADD', stream, '*',
  'id', ARGV[6], 'acct', ARGV[1], 'kind', ARGV[2], 'amount', ARGV[12],
  'd_allow', ARGV[3], 'd_purch', ARGV[4], 'allow', allowance, 'purch', purchased,
  'route', ARGV[8], 'action', ARGV[9], 'req', ARGV[10], 'reason', ARGV[11], 'ts', ARGV[5])
return {0, allowance, purchased}
