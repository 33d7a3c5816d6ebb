-- slice: one instance's report for one shard — the credit-lease path (DESIGN "Credit leases").
-- An instance serves requests from a slice of an account's balance that this script reserved
-- for it (`leased` on the account hash counts every instance's outstanding slices; the money
-- itself stays in allowance/purchased until a request spends it). Each report applies the
-- requests the instance served since its last one (journal rows, allowance first), then sets
-- the instance's slice of each account to the size it asks for. One call per shard per batch
-- window, whatever the number of accounts and requests.
--
-- KEYS: 1 shard usage stream, 2 shard slices zset (member "instance|account", score = expiry
--       ms), 3 shard slice amounts hash (member -> µc; "seq:<instance>" -> last report applied;
--       "reply:<instance>" -> that report's reply), 3+i the account hash of section i
-- ARGV: 1 instance id, 2 report sequence number (per instance and shard, increasing; a report
--       whose outcome was unknown is sent again with the same number and rows: it applies
--       once, the repeat gets the stored reply), 3 now (unix ms), 4 slice ttl (ms),
--       5 number of account sections, then per section:
--         account id, tier, monthly credits (µc, -1 = unlimited), wanted slice (µc),
--         floor (µc: a slice smaller than this is useless; grant nothing then), row count,
--         then per row 9 fields: type, charge id, amount (µc), part (µc), route, action,
--         ts (ms), request id, extra. Types:
--           'd' a charge (a fixed price, or a metered request's hold): counted as a request;
--           'r' a fixed charge given back whole; part = its allowance part (-1 = the debit is
--               in this report);
--           'x' more taken for a running hold; extra = its number (entry id <charge>:x<n>);
--           's' a hold settled: amount = true cost - held (negative = money back, to
--               purchased first as far as the hold took from it, then to the allowance;
--               positive = the extra, allowance first, purchased may go below zero, as
--               settle.lua does); part = the purchased part of the hold in earlier reports
--               (this report's own rows are added here); extra = the usage for the journal
--               row, 'tok_in|tok_out|status|duration_ms|reason' (tokens count against
--               tok_p).
-- Reply: {'dup', the first reply as '\n'-joined text} for a repeat; otherwise flat, per section: code, slice (µc), allowance, purchased, leased, period_end,
--        status/tier text, number of 'd' and 'x' rows, then each one's allowance part.
--        code 0 ok; 1 account missing (its rows were NOT applied: hydrate and send again);
--        2 not enough unreserved balance for the floor (slice returned); 5 not active (text =
--        status; slice returned); 6 tier differs (text = tier; slice returned). Rows of codes
--        0, 2, 5 and 6 are applied: they were served under the plan the instance knew.
local stream, zs, sh = KEYS[1], KEYS[2], KEYS[3]
local inst, seq = ARGV[1], tonumber(ARGV[2])
local now_ms, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local now_s = math.floor(now_ms / 1000)
local n = tonumber(ARGV[5])
local function int(x) return string.format('%d', x) end

local seqf, replyf = 'seq:' .. inst, 'reply:' .. inst
if seq <= tonumber(redis.call('HGET', sh, seqf) or '0') then
  local stored = redis.call('HGET', sh, replyf)
  return {'dup', stored or ''}
end

local rows, usage, out = {}, {}, {}
local a = 6
for i = 1, n do
  local acct = KEYS[3 + i]
  local id, tier = ARGV[a], ARGV[a + 1]
  local monthly, wanted, floor = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local nrows = tonumber(ARGV[a + 5])
  local r0 = a + 6
  a = r0 + nrows * 9
  local member = inst .. '|' .. id
  local f = redis.call('HMGET', acct, 'tier', 'status', 'period_end', 'allowance', 'purchased',
    'leased', 'req_h_idx', 'req_h', 'req_p')
  if not f[1] then
    for _, v in ipairs({1, 0, 0, 0, 0, 0, '', 0}) do out[#out + 1] = v end
  else
    local cur_tier, status = f[1], f[2] or 'active'
    local period_end = tonumber(f[3] or '0')
    local allowance, purchased = tonumber(f[4] or '0'), tonumber(f[5] or '0')
    local leased = tonumber(f[6] or '0')
    local hidx, req_h, req_p = tonumber(f[7] or '-1'), tonumber(f[8] or '0'), tonumber(f[9] or '0')
    local slice = tonumber(redis.call('HGET', sh, member) or '0')
    local limited = monthly >= 0
    local acts, splits, batch = {}, {}, {}
    local function act(name)
      local t = acts[name]
      if not t then
        local k = 'a:' .. name
        local v = redis.call('HMGET', acct, k .. ':hidx', k .. ':h', k .. ':p')
        t = {k = k, hidx = tonumber(v[1] or '-1'), h = tonumber(v[2] or '0'), p = tonumber(v[3] or '0')}
        acts[name] = t
      end
      return t
    end
    local tokens = 0
    for r = 0, nrows - 1 do
      local b = r0 + r * 9
      local typ, charge, amount = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2])
      local route, action, ts, req = ARGV[b + 4], ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
      local extra = ARGV[b + 8]
      if typ == 'd' or typ == 'x' then
        local fa, fp = 0, 0
        if limited then
          fa = math.min(math.max(allowance, 0), amount)
          fp = amount - fa
          allowance = allowance - fa
          purchased = purchased - fp
        end
        slice = math.max(slice - amount, 0)
        leased = math.max(leased - amount, 0)
        local held = batch[charge]
        if not held then held = {fa = 0, fp = 0}; batch[charge] = held end
        held.fa, held.fp = held.fa + fa, held.fp + fp
        splits[#splits + 1] = fa
        if typ == 'd' then
          local hour = math.floor(tonumber(ts) / 3600000)
          if hour > hidx then hidx = hour; req_h = 0 end
          if hour == hidx then req_h = req_h + 1 end
          req_p = req_p + 1
          local t = act(action)
          if hour > t.hidx then t.hidx = hour; t.h = 0 end
          if hour == t.hidx then t.h = t.h + 1 end
          t.p = t.p + 1
          rows[#rows + 1] = table.concat({charge .. ':debit', id, 'debit', int(amount), int(-fa),
            int(-fp), int(allowance), int(purchased), route, action, cur_tier, ts, req}, '|')
        else
          rows[#rows + 1] = table.concat({charge .. ':x' .. extra, id, 'extend', int(amount),
            int(-fa), int(-fp), int(allowance), int(purchased), route, action, cur_tier, ts, req}, '|')
        end
      elseif typ == 'r' then
        local fa = tonumber(ARGV[b + 3])
        if fa < 0 then fa = (batch[charge] and batch[charge].fa) or 0 end
        if not limited then fa = 0 end
        local fp = 0
        if limited then fp = amount - fa end
        allowance = allowance + fa
        purchased = purchased + fp
        rows[#rows + 1] = table.concat({charge .. ':refund', id, 'refund', int(-amount), int(fa),
          int(fp), int(allowance), int(purchased), route, action, cur_tier, ts, req}, '|')
      else
        local da, dp = 0, 0
        if limited then
          if amount < 0 then
            local held_fp = math.max(tonumber(ARGV[b + 3]), 0)
              + ((batch[charge] and batch[charge].fp) or 0)
            dp = math.min(-amount, held_fp)
            da = -amount - dp
          elseif amount > 0 then
            da = -math.min(math.max(allowance, 0), amount)
            dp = -(amount + da)
          end
          allowance = allowance + da
          purchased = purchased + dp
        end
        if amount > 0 then
          slice = math.max(slice - amount, 0)
          leased = math.max(leased - amount, 0)
        end
        local tin, tout = string.match(extra, '^(%d*)|(%d*)|')
        tokens = tokens + (tonumber(tin) or 0) + (tonumber(tout) or 0)
        rows[#rows + 1] = table.concat({charge .. ':settle', id, 'settle', int(amount), int(da),
          int(dp), int(allowance), int(purchased), route, action, cur_tier, ts, req}, '|')
        usage[#usage + 1] = charge .. ':settle|' .. extra
      end
    end
    if tokens > 0 then redis.call('HINCRBY', acct, 'tok_p', int(tokens)) end
    local code, text = 0, ''
    if status ~= 'active' then
      code, text, wanted = 5, status, 0
    elseif cur_tier ~= tier then
      code, text, wanted = 6, cur_tier, 0
    end
    -- The slice never outlives the period: the roll resets the allowance it was taken from.
    if now_s >= period_end then wanted = 0 end
    local grant = wanted
    if limited then
      local free = allowance + purchased - (leased - slice)
      grant = math.max(math.min(wanted, free), 0)
    end
    if grant < floor then
      if code == 0 then code = 2 end
      grant = 0
    end
    if grant ~= slice then
      rows[#rows + 1] = table.concat({'lease:' .. inst .. ':' .. int(seq) .. ':' .. id, id, 'lease',
        int(grant - slice), '0', '0', int(allowance), int(purchased), '', '', cur_tier,
        int(now_ms), ''}, '|')
    end
    leased = leased - slice + grant
    slice = grant
    redis.call('HSET', acct, 'allowance', int(allowance), 'purchased', int(purchased),
      'leased', int(leased), 'req_h', req_h, 'req_h_idx', hidx, 'req_p', req_p)
    for _, t in pairs(acts) do
      redis.call('HSET', acct, t.k .. ':hidx', t.hidx, t.k .. ':h', t.h, t.k .. ':p', t.p)
    end
    if slice > 0 then
      redis.call('HSET', sh, member, int(slice))
      redis.call('ZADD', zs, math.min(now_ms + ttl, period_end * 1000), member)
    else
      redis.call('HDEL', sh, member)
      redis.call('ZREM', zs, member)
    end
    out[#out + 1] = code
    out[#out + 1] = slice
    out[#out + 1] = allowance
    out[#out + 1] = purchased
    out[#out + 1] = leased
    out[#out + 1] = period_end
    out[#out + 1] = text
    out[#out + 1] = #splits
    for _, s in ipairs(splits) do out[#out + 1] = s end
  end
end
if #usage > 0 then
  redis.call('XADD', stream, '*', 'rows', table.concat(rows, '\n'), 'usage', table.concat(usage, '\n'))
elseif #rows > 0 then
  redis.call('XADD', stream, '*', 'rows', table.concat(rows, '\n'))
end
-- Kept for a repeat of this report (its sender did not see this reply): numbers as exact
-- integer text (cjson would round them to 14 digits).
local kept = {}
for i, v in ipairs(out) do
  if type(v) == 'number' then kept[i] = int(v) else kept[i] = v end
end
redis.call('HSET', sh, seqf, int(seq), replyf, table.concat(kept, '\n'))
return out
