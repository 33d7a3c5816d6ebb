-- billing_status: a subscription's payment state. `past_due` keeps the account served until
-- the grace deadline (the debit script freezes the allowance after it; purchased credits stay
-- usable); `active` lifts it. An account an operator suspended keeps that status.
-- KEYS: 1 account hash
-- ARGV: 1 "past_due" | "active", 2 grace deadline (unix s; with past_due)
-- Reply: {0, status after}; {1} account missing
local acct = KEYS[1]
if redis.call('EXISTS', acct) == 0 then return {1} end
local cur = redis.call('HGET', acct, 'status') or 'active'
if cur ~= 'active' and cur ~= 'past_due' then return {0, cur} end
if ARGV[1] == 'past_due' then
  redis.call('HSET', acct, 'status', 'past_due', 'grace_until', ARGV[2])
else
  redis.call('HSET', acct, 'status', 'active')
  redis.call('HDEL', acct, 'grace_until')
end
return {0, ARGV[1]}
