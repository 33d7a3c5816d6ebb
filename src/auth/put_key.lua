-- put_key: writes one API key record (`{prefix:kN}:key:<sha256 hex>`), never letting an older
-- state overwrite a newer one, so a re-fill from a stale Postgres row cannot revive a key
-- revoked (or an account suspended) while Postgres was away.
-- KEYS: 1 key record (hash)
-- ARGV: 1 version (µs since the epoch; 0 for a re-fill), 2 mode, then field/value pairs
--   mode 'fill'  : only when no record exists (re-fill from Postgres)
--   mode 'set'   : unless the record holds a newer version (creation, revocation)
--   mode 'patch' : only an existing, newer-or-equal record is left alone; a missing one stays
--                  missing (tier/status changes)
-- A revoked record stays revoked whatever comes later.
-- Reply: 1 written, 0 left alone
local rec = KEYS[1]
local cur = redis.call('HGET', rec, 'ver')
local ver = tonumber(ARGV[1])
if cur then
  if ARGV[2] == 'fill' then return 0 end
  if tonumber(cur) > ver then return 0 end
else
  if ARGV[2] == 'patch' then return 0 end
end
local revoked = redis.call('HGET', rec, 'revoked') == '1'
local args = {}
for i = 3, #ARGV, 2 do
  if not (revoked and ARGV[i] == 'revoked') then
    args[#args + 1] = ARGV[i]
    args[#args + 1] = ARGV[i + 1]
  end
end
redis.call('HSET', rec, 'ver', ARGV[1], unpack(args))
return 1
