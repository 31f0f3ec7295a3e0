-- Check the rate and the quota of one subscription; only if both admit, take one request of
-- the rate and `cost` units of the quota, and count the request in the day's history.
--
-- KEYS[1]  sorted set: the admission times (microseconds, Redis clock) inside the rate window
-- KEYS[2]  hash: the quota of the current calendar period: used, credit, born
-- KEYS[3]  hash: the history of the current UTC day: born, r:<plan> (requests), u:<plan> (units)
-- KEYS[4]  optional, with KEYS[5]: set, the subscriptions with history that UTC day
-- KEYS[5]  set: the products with history of the subscription's key (redis_registry.py)
-- ARGV[1]  rate limit, or -1 when the plan has no rate
-- ARGV[2]  rate window in microseconds
-- ARGV[3]  quota limit, or -1 when the plan has no quota
-- ARGV[4]  unix milliseconds at which the quota hash may vanish (period end + grace)
-- ARGV[5]  unix milliseconds at which the day's history may vanish, and the sets with it
-- ARGV[6]  the plan's name
-- ARGV[7]  the subject, member of KEYS[4] (read only with KEYS[4])
-- ARGV[8]  its product, member of KEYS[5] (read only with KEYS[5])
-- ARGV[9]  cost: the quota units this request takes
-- ARGV[10] the Redis time (microseconds) after which the gateway no longer waits for this
--          reply, or 0: a hit that runs later (a stalled Redis waking up) takes nothing,
--          since its request was answered 503 meanwhile
--
-- Returns {outcome, quota used, quota credit, rate entries in window, microseconds until the
-- rate frees room, quota born, day born, day begun, the Redis time} where outcome is 0
-- allowed, 1 throttled, 2 quota exceeded, 3 too late (nothing was looked at or taken), and
-- day begun is 0 when the day's history was there already, 1 when this admission began it
-- and the sets were not written (no KEYS[4]: a cluster, where they live in other slots; or
-- they could not be), 2 when it began it and the sets name the subscription. `born` is the
-- Redis time at
-- which a hash was created: a refund names it, and does nothing to a hash born since (after
-- a restart that lost it, or a new period), so units are never given back twice or to
-- requests that did not take them.
--
-- The time comes from Redis so that gateways with skewed clocks share one notion of "now";
-- calling TIME before writing needs effects replication, the default since Redis 5.

-- Numbers go to redis.call as decimal strings where that is cheap (ARGV as given, the stamp,
-- string.format('%d')): a Lua number is a double, which redis.call formats with "%.17g" and
-- Redis parses back, about 7% of the script's time on the bench's hits (bench/PROFILE.md,
-- "Session 10").
local rate_limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local quota_limit = tonumber(ARGV[3])
local cost = tonumber(ARGV[9])

-- Adds `member` to the set `name`, kept as long as the day's history; false if Redis refused
-- (a key of another type there): the admission stands, and the gateway writes the sets itself
-- (and again until they are in), as on a cluster, instead of failing a counted admission.
local function index(name, member)
    if type(redis.pcall('SADD', name, member)) == 'table' then
        return false
    end
    redis.call('PEXPIREAT', name, ARGV[5])
    return true
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local deadline = tonumber(ARGV[10])
if deadline > 0 and now > deadline then
    return {3, 0, 0, 0, 0, 0, 0, 0, now}
end

local used, credit, quota_born = 0, 0, 0
if quota_limit >= 0 then
    local quota = redis.call('HMGET', KEYS[2], 'used', 'credit', 'born')
    used = tonumber(quota[1] or 0)
    credit = tonumber(quota[2] or 0)
    quota_born = tonumber(quota[3] or 0)
end

local in_window = 0
if rate_limit >= 0 then
    -- an admission exactly one window old has left the window
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - window))
    in_window = redis.call('ZCARD', KEYS[1])
end

local outcome = 0
local day_born, new_day = 0, 0
if quota_limit >= 0 and used + cost > quota_limit + credit then
    outcome = 2
elseif rate_limit >= 0 and in_window >= rate_limit then
    outcome = 1
else
    if quota_limit >= 0 then
        used = redis.call('HINCRBY', KEYS[2], 'used', ARGV[9])
        if quota_born == 0 then
            -- the counter of a new period: it vanishes on its own soon after the period ends
            quota_born = now
            redis.call('HSET', KEYS[2], 'born', now)
            -- Never in the past on Redis's clock: a gateway whose clock lags would otherwise
            -- see its counter deleted at once, and every hit would find it empty.
            redis.call('PEXPIREAT', KEYS[2], math.max(tonumber(ARGV[4]), math.floor(now / 1000) + 60000))
        end
    end
    if rate_limit >= 0 then
        -- members must be unique, and two admissions may share a microsecond
        local stamp = string.format('%s%06d', clock[1], tonumber(clock[2]))
        local member = stamp
        local suffix = in_window
        while redis.call('ZADD', KEYS[1], 'NX', stamp, member) == 0 do
            suffix = suffix + 1
            member = stamp .. '-' .. suffix
        end
        redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil(window / 1000) + 1))
        in_window = in_window + 1
    end
    day_born = tonumber(redis.call('HGET', KEYS[3], 'born') or 0)
    if day_born == 0 then
        day_born = now
        new_day = 1
        redis.call('HSET', KEYS[3], 'born', now)
        redis.call('PEXPIREAT', KEYS[3], ARGV[5])
        -- The export and a key's history find the day through these sets: written here, with
        -- the counts, a worker killed right after the reply cannot leave the day unbilled.
        if KEYS[5] and index(KEYS[4], ARGV[7]) and index(KEYS[5], ARGV[8]) then
            new_day = 2
        end
    end
    redis.call('HINCRBY', KEYS[3], 'r:' .. ARGV[6], '1')
    redis.call('HINCRBY', KEYS[3], 'u:' .. ARGV[6], ARGV[9])
end

local wait = 0
if rate_limit >= 0 and in_window > 0 then
    -- the entry whose departure leaves limit-1 behind (more than limit may remain after a
    -- reload lowered the limit)
    local rank = in_window - rate_limit
    if rank < 0 then
        rank = 0
    end
    local rank_text = string.format('%d', rank)
    local entry = redis.call('ZRANGE', KEYS[1], rank_text, rank_text, 'WITHSCORES')
    wait = tonumber(entry[2]) + window - now
end

return {outcome, used, credit, in_window, wait, quota_born, day_born, new_day, now}
