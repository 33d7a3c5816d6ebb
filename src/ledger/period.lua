-- Calendar arithmetic for billing periods (Howard Hinnant's civil-date algorithms), so a
-- period that ends on Jan 31 next ends on Feb 28/29 and then Mar 31 (the anchor day).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m
  if mp < 10 then m = mp + 3 else m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function days_in_month(y, m)
  local ny, nm = y, m + 1
  if nm > 12 then nm = 1; ny = ny + 1 end
  return days_from_civil(ny, nm, 1) - days_from_civil(y, m, 1)
end

-- The period end one month after `ts` (unix seconds), on the anchor day where the month has it.
local function add_month(ts, anchor_day)
  local days = math.floor(ts / 86400)
  local secs = ts - days * 86400
  local y, m = civil_from_days(days)
  m = m + 1
  if m > 12 then m = 1; y = y + 1 end
  local d = math.min(anchor_day, days_in_month(y, m))
  return days_from_civil(y, m, d) * 86400 + secs
end

-- Rolls the account's period forward while `now_s >= period_end`: the allowance is reset to
-- the tier's monthly credits (no roll-over), period counters are cleared, and one `reset`
-- journal entry records the change. Returns nothing; mutates the hash.
local function roll_period(acct, stream, account_id, monthly, now_s, now_ms, charge_id)
  local period_end = tonumber(redis.call('HGET', acct, 'period_end') or '0')
  if now_s < period_end then return end
  local anchor = tonumber(redis.call('HGET', acct, 'anchor_day') or '1')
  local period_start = period_end
  local guard = 0
  while now_s >= period_end and guard < 1200 do
    period_start = period_end
    period_end = add_month(period_end, anchor)
    guard = guard + 1
  end
  local allowance = tonumber(redis.call('HGET', acct, 'allowance') or '0')
  local purchased = tonumber(redis.call('HGET', acct, 'purchased') or '0')
  local new_allowance = 0
  if monthly >= 0 then new_allowance = monthly end
  redis.call('HSET', acct, 'allowance', new_allowance, 'period_start', period_start, 'period_end', period_end, 'req_p', 0, 'tok_p', 0)
  local fields = redis.call('HKEYS', acct)
  for _, f in ipairs(fields) do
    if string.sub(f, 1, 2) == 'a:' and string.sub(f, -2) == ':p' then
      redis.call('HSET', acct, f, 0)
    end
  end
  redis.call('XADD', stream, '*',
    'id', charge_id .. ':reset:' .. period_start, 'acct', account_id, 'kind', 'reset',
    'amount', 0, 'd_allow', new_allowance - allowance, 'd_purch', 0,
    'allow', new_allowance, 'purch', purchased, 'ts', now_ms,
    'period_start', period_start, 'period_end', period_end)
end
