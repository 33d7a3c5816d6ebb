-- extend: keeps a hold alive and, with a step, takes more for it: the next started minute of
-- a long session, or the next slice of a stream whose running cost passed what is held.
-- Takes the step when the balance outside credit slices has it, else what is left (never below
-- zero), and says so: the caller then ends the stream. Each amount taken is journaled (`extend`).
-- KEYS: 1 account hash, 2 shard usage stream, 3 shard holds zset, 4 shard hold records hash,
--       5 account lease zset, 6 the account's lease zset for the request's action
-- ARGV: 1 charge id, 2 step (µc; 0 = only renew the hold's and the lease's expiry),
--       3 now (ms), 4 ttl (ms), 5 reason
-- Reply: {0, taken, held, short (1 = took less than the step), balance after}
--        {1}  no such hold (settled or swept)
local acct, stream, holds, data, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local charge_id, step = ARGV[1], tonumber(ARGV[2])
local now_ms, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local h = read_hold(data, charge_id)
if not h or redis.call('EXISTS', acct) == 0 then return {1} end
redis.call('ZADD', holds, 'XX', now_ms + ttl, charge_id)
for _, zset in ipairs({leases, KEYS[6]}) do
  if redis.call('ZSCORE', zset, charge_id) then
    redis.call('ZADD', zset, 'XX', now_ms + ttl, charge_id)
    if redis.call('PTTL', zset) < ttl then redis.call('PEXPIRE', zset, ttl) end
  end
end
local usable, allowance = usable_allowance(acct, now_ms)
local purchased = tonumber(redis.call('HGET', acct, 'purchased') or '0')
if step <= 0 then return {0, 0, int(h.held), 0, int(usable + purchased)} end

local take, ta, tp = step, 0, 0
if not h.unl then
  -- Money reserved in other instances' credit slices is not free: they may spend it.
  local leased = tonumber(redis.call('HGET', acct, 'leased') or '0')
  take = math.min(step, math.max(usable + purchased - leased, 0))
  ta = math.min(math.max(usable, 0), take)
  tp = take - ta
end
local short = 0
if take < step then short = 1 end
if take > 0 then
  if ta ~= 0 then allowance = redis.call('HINCRBY', acct, 'allowance', int(-ta)) end
  if tp ~= 0 then purchased = redis.call('HINCRBY', acct, 'purchased', int(-tp)) end
  h.held, h.fa, h.fp, h.n = h.held + take, h.fa + ta, h.fp + tp, h.n + 1
  write_hold(data, charge_id, h)
  redis.call('XADD', stream, '*',
    'id', charge_id .. ':x' .. h.n, 'acct', h.acct, 'kind', 'extend', 'amount', int(take),
    'd_allow', int(-ta), 'd_purch', int(-tp), 'allow', int(allowance), 'purch', int(purchased),
    'route', h.route, 'action', h.action, 'req', h.req, 'tier', h.tier, 'reason', ARGV[5],
    'ts', ARGV[3])
end
usable = usable_allowance(acct, now_ms)
return {0, int(take), int(h.held), short, int(usable + purchased)}
