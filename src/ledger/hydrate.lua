-- hydrate: creates the account hash from Postgres' view of it (the journal's sums), only if it
-- is absent: several instances may race to hydrate one account; the first wins.
-- KEYS: 1 account hash, 2 shard usage stream
-- ARGV: 1 tier, 2 status, 3 allowance (µc), 4 purchased (µc), 5 period_start (s),
--       6 period_end (s), 7 anchor day, 8 account id, 9 opening ("1" = the account has no
--       journal yet: its first allowance is journaled here), 10 now (ms), 11 payment grace
--       deadline (unix s; "0" = in good standing): an active account whose subscription is
--       past due (accounts.grace_until) comes back as `past_due` with that deadline
-- Reply: 1 created, 0 already present
local acct, stream = KEYS[1], KEYS[2]
if redis.call('EXISTS', acct) == 1 then return 0 end
redis.call('HSET', acct, 'tier', ARGV[1], 'status', ARGV[2], 'allowance', ARGV[3],
  'purchased', ARGV[4], 'period_start', ARGV[5], 'period_end', ARGV[6], 'anchor_day', ARGV[7],
  'req_p', 0)
if tonumber(ARGV[11] or '0') > 0 and ARGV[2] == 'active' then
  redis.call('HSET', acct, 'status', 'past_due', 'grace_until', ARGV[11])
end
if ARGV[9] == '1' then
  redis.call('XADD', stream, '*', 'id', ARGV[8] .. ':open:' .. ARGV[5], 'acct', ARGV[8],
    'kind', 'reset', 'amount', 0, 'd_allow', tonumber(ARGV[3]), 'd_purch', tonumber(ARGV[4]),
    'allow', tonumber(ARGV[3]), 'purch', tonumber(ARGV[4]), 'tier', ARGV[1], 'ts', tonumber(ARGV[10]),
    'period_start', tonumber(ARGV[5]), 'period_end', tonumber(ARGV[6]))
end
return 1
