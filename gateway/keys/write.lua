-- One change of the key store, atomic on the server: check, write, bump the version, log it,
-- announce it.
-- KEYS[1] records (hash name -> record), KEYS[2] owners (hash digest -> name), KEYS[3] version,
-- KEYS[4] log (sorted set of the recent changes), KEYS[5] epoch
-- ARGV[1] channel, ARGV[2] name, ARGV[3] expected record ("" = the name must be free),
-- ARGV[4] new record ("" = delete), ARGV[5] the Redis time (microseconds) after which the
-- gateway no longer waits for this reply, or 0, ARGV[6] number of digests to add, then those
-- digests, then the digests to remove.
-- Returns {version or 0, outcome, the Redis time, the epoch it began or ''}. A write that runs
-- after its deadline (a stalled Redis waking up) changes nothing: its caller was answered 503
-- meanwhile.
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local deadline = tonumber(ARGV[5])
if deadline > 0 and now_us > deadline then return {0, 'too_late', now_us} end
local name = ARGV[2]
local current = redis.call('HGET', KEYS[1], name)
if ARGV[3] == '' then
  if current then return {0, 'name_taken', now_us} end
elseif not current then
  return {0, 'not_found', now_us}
elseif current ~= ARGV[3] then
  return {0, 'changed', now_us}
end
local last_add = 6 + tonumber(ARGV[6])
for i = 7, last_add do
  local owner = redis.call('HGET', KEYS[2], ARGV[i])
  if owner and owner ~= name then return {0, 'secret_taken', now_us} end
end
for i = last_add + 1, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == name then redis.call('HDEL', KEYS[2], ARGV[i]) end
end
for i = 7, last_add do redis.call('HSET', KEYS[2], ARGV[i], name) end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], name)
else
  redis.call('HSET', KEYS[1], name, ARGV[4])
end
local version = redis.call('INCR', KEYS[3])
local begun = ''
if version == 1 then
  -- A new store, or one emptied since: its versions are not those of before, and a follower
  -- that knew the old one tells them apart by this.
  begun = now[1] .. '.' .. now[2]
  redis.call('SET', KEYS[5], begun)
  -- Announced as version 0, just before the change: a follower that read the store empty
  -- takes this epoch for the one it read, and goes on without reading every key again
  -- (gateway processes before this ignore a version 0 as one they have).
  redis.call('PUBLISH', ARGV[1], '0\n\n' .. begun)
end
-- Which key each recent version changed: a follower that missed announcements reads those
-- keys again instead of every key (changes.lua). The newest 10,000 are kept.
redis.call('ZADD', KEYS[4], version, version .. '\n' .. name)
if version % 100 == 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -10001)
end
redis.call('PUBLISH', ARGV[1], version .. '\n' .. name .. '\n' .. ARGV[4])
return {version, 'ok', now_us, begun}
