-- renew: a paid subscription invoice. The account is in good standing again (past_due →
-- active) and its billing period follows the invoice's. On a renewal the allowance is reset to
-- the tier's monthly credits (a `reset` journal entry), unless the account already rolled into
-- that period by itself (the debit script's lazy roll at the boundary got there first): one
-- period never gets two allowances, and the period never moves backwards (an old invoice
-- arriving late changes nothing). Idempotent on the invoice (the mark).
-- KEYS: 1 account hash, 2 shard usage stream, 3 idempotency mark
-- ARGV: 1 account id, 2 monthly credits (µc, -1 = unlimited), 3 period start (s),
--       4 period end (s), 5 anchor day, 6 "1" = renewal (reset the allowance), "0" = align
--       only, 7 now (ms), 8 entry id, 9 mark ttl (s), 10 tier
-- Reply: {0, allowance, purchased, reset (0/1)} applied; {1} account missing;
--        {2, allowance, purchased} already applied
local acct, stream, mark = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', acct) == 0 then return {1} end
local allowance = tonumber(redis.call('HGET', acct, 'allowance') or '0')
local purchased = tonumber(redis.call('HGET', acct, 'purchased') or '0')
if redis.call('EXISTS', mark) == 1 then return {2, allowance, purchased} end
local monthly = tonumber(ARGV[2])
local new_start, new_end = tonumber(ARGV[3]), tonumber(ARGV[4])
local cur_start = tonumber(redis.call('HGET', acct, 'period_start') or '0')

if (redis.call('HGET', acct, 'status') or 'active') == 'past_due' then
  redis.call('HSET', acct, 'status', 'active')
  redis.call('HDEL', acct, 'grace_until')
end

local did_reset = 0
if new_start > cur_start then
  redis.call('HSET', acct, 'period_start', new_start, 'period_end', new_end, 'anchor_day', ARGV[5])
  if ARGV[6] == '1' then
    local new_allowance = 0
    if monthly >= 0 then new_allowance = monthly end
    redis.call('HSET', acct, 'allowance', new_allowance, 'req_p', 0)
    for _, f in ipairs(redis.call('HKEYS', acct)) do
      if string.sub(f, 1, 2) == 'a:' and string.sub(f, -2) == ':p' then
        redis.call('HSET', acct, f, 0)
      end
    end
    redis.call('XADD', stream, '*',
      'id', ARGV[8], 'acct', ARGV[1], 'kind', 'reset', 'amount', 0,
      'd_allow', new_allowance - allowance, 'd_purch', 0,
      'allow', new_allowance, 'purch', purchased, 'tier', ARGV[10], 'reason', 'invoice paid',
      'ts', ARGV[7], 'period_start', new_start, 'period_end', new_end)
    allowance = new_allowance
    did_reset = 1
  end
elseif new_start == cur_start then
  redis.call('HSET', acct, 'period_end', new_end)
end
redis.call('SET', mark, ARGV[8], 'EX', tonumber(ARGV[9]))
return {0, allowance, purchased, did_reset}
