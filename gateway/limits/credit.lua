-- Add credit to the current period of one subscription's quota.
--
-- KEYS[1]  hash: the quota of the current period (see hit.lua)
-- ARGV[1]  units to add
-- ARGV[2]  unix milliseconds at which the hash may vanish (period end + grace)
--
-- Returns {used, credit}. A period nobody has used yet gets its hash here, born now, with the
-- expiry hit.lua would give it: the credit ends with the period.

local credit = redis.call('HINCRBY', KEYS[1], 'credit', ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'born') == 0 then
    local clock = redis.call('TIME')
    redis.call('HSET', KEYS[1], 'born', tonumber(clock[1]) * 1000000 + tonumber(clock[2]))
    -- never in the past on Redis's clock (see hit.lua)
    redis.call('PEXPIREAT', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(clock[1]) * 1000 + 60000))
end
return {tonumber(redis.call('HGET', KEYS[1], 'used') or 0), credit}
