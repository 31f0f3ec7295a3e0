-- What a follower of the key store missed since the version it is at, read atomically.
-- KEYS[1] version, KEYS[2] epoch, KEYS[3] log (see write.lua)
-- ARGV[1] the follower's version
-- Returns {version, epoch ('' if none), then each logged change after ARGV[1] up to version,
-- oldest first, as "VERSION\nNAME"}. The log holds the newest 10,000 changes: the caller
-- checks that it reaches back to its version.
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
local reply = {version, redis.call('GET', KEYS[2]) or ''}
if version > tonumber(ARGV[1]) then
  local changes = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf')
  for i = 1, #changes do
    reply[i + 2] = changes[i]
  end
end
return reply
