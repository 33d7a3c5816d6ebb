-- Raises each key's last-use time (unix seconds) in one account's hash, never lowers it: two
-- instances flushing in either order leave the later use.
-- KEYS[1] the account's keyused hash; ARGV key_id, secs, key_id, secs, ...
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') or 0
  if tonumber(ARGV[i + 1]) > cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
