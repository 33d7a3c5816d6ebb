-- restore: sets an account's buckets to the journal's view, but only if they have not moved
-- since the snapshot the caller computed it from (compare-and-set); live traffic makes the
-- caller take a new snapshot and try again.
-- KEYS: 1 account hash
-- ARGV: 1 expected allowance, 2 expected purchased, 3 new allowance, 4 new purchased
-- Reply: 1 restored, 0 moved (retry), -1 missing
local acct = KEYS[1]
if redis.call('EXISTS', acct) == 0 then return -1 end
local a = tonumber(redis.call('HGET', acct, 'allowance') or '0')
local p = tonumber(redis.call('HGET', acct, 'purchased') or '0')
if a ~= tonumber(ARGV[1]) or p ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', acct, 'allowance', ARGV[3], 'purchased', ARGV[4])
return 1
