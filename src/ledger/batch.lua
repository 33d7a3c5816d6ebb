-- batch: group commit. Several calls of one script, all on one shard, in one call: each runs
-- exactly as the script alone would run it, in arrival order. `one` above this text is the
-- script itself (debit.lua, settle.lua) with KEYS and ARGV as its parameters. A call whose
-- script raises an error answers {-1, message}; the calls before and after it stand (as
-- separate calls would: Redis does not roll a failed script back either).
-- KEYS: each call's keys, concatenated (ARGV[1] per call)
-- ARGV: 1 keys per call, 2 args per call, then each call's args, concatenated
-- Reply: one reply of the script per call, in order
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 0, #KEYS / nk - 1 do
  local k, a = {}, {}
  for j = 1, nk do k[j] = KEYS[i * nk + j] end
  for j = 1, na do a[j] = ARGV[2 + i * na + j] end
  local ok, reply = pcall(one, k, a)
  if ok then
    out[i + 1] = reply
  elseif type(reply) == 'table' and reply.err then
    out[i + 1] = {-1, reply.err}
  else
    out[i + 1] = {-1, tostring(reply)}
  end
end
return out
