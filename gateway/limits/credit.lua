-- Add credit to the current period of one subscription's quota.
--
-- KEYS[1]  hash: the quota of the current period (see hit.lua)
-- KEYS[2]  optional: the record of the call's idempotency key (gw:{<subject>}:credit:<key>)
-- ARGV[1]  units to add
-- ARGV[2]  unix milliseconds at which the hash may vanish (period end + grace)
-- ARGV[3]  with KEYS[2]: milliseconds the record is kept
--
-- Returns {used, credit, earlier}: earlier is -1, or, when the idempotency key was used
-- before, the units that first call added (and nothing is added now). A period nobody has
-- used yet gets its hash here, born now, with the expiry hit.lua would give it: the credit
-- ends with the period.

if #KEYS > 1 then
    local earlier = redis.call('GET', KEYS[2])
    if earlier then
        local now = redis.call('HMGET', KEYS[1], 'used', 'credit')
        return {tonumber(now[1] or 0), tonumber(now[2] or 0), tonumber(earlier)}
    end
end
local credit = redis.call('HINCRBY', KEYS[1], 'credit', ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'born') == 0 then
    local clock = redis.call('TIME')
    redis.call('HSET', KEYS[1], 'born', tonumber(clock[1]) * 1000000 + tonumber(clock[2]))
    -- never in the past on Redis's clock (see hit.lua)
    redis.call('PEXPIREAT', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(clock[1]) * 1000 + 60000))
end
-- Recorded only once the credit is in: a script is not rolled back, and a key recorded
-- before a failing HINCRBY would make every retry "replay" a credit never added.
if #KEYS > 1 then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
end
return {tonumber(redis.call('HGET', KEYS[1], 'used') or 0), credit, -1}
