-- uncount: a request that counted a resource (`counts` on its route) did not succeed upstream,
-- so its count is taken back (never below zero).
-- KEYS: 1 account hash
-- ARGV: 1 resource, 2 the delta the debit applied
-- Reply: the resource's count after
local rk = 'r:' .. ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(redis.call('HGET', KEYS[1], rk) or '0') - tonumber(ARGV[2])
if n < 0 then n = 0 end
redis.call('HSET', KEYS[1], rk, string.format('%d', n))
return n
