-- Check the rate and the quota of one subscription; consume one of each only if both admit.
--
-- KEYS[1]  sorted set: the admission times (microseconds, Redis clock) inside the rate window
-- KEYS[2]  string: the quota counter of the current calendar period
-- ARGV[1]  rate limit, or -1 when the plan has no rate
-- ARGV[2]  rate window in microseconds
-- ARGV[3]  quota limit, or -1 when the plan has no quota
-- ARGV[4]  unix milliseconds at which the quota counter may vanish (period end + grace)
--
-- Returns {outcome, quota used, rate entries in window, microseconds until the rate frees room}
-- where outcome is 0 allowed, 1 throttled, 2 quota exceeded.
--
-- The time comes from Redis so that gateways with skewed clocks share one notion of "now";
-- calling TIME before writing needs effects replication, the default since Redis 5.

local rate_limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local quota_limit = tonumber(ARGV[3])
local quota_expire_at = tonumber(ARGV[4])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local used = 0
if quota_limit >= 0 then
    used = tonumber(redis.call('GET', KEYS[2]) or 0)
end

local in_window = 0
if rate_limit >= 0 then
    -- an admission exactly one window old has left the window
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
    in_window = redis.call('ZCARD', KEYS[1])
end

local outcome = 0
if quota_limit >= 0 and used >= quota_limit then
    outcome = 2
elseif rate_limit >= 0 and in_window >= rate_limit then
    outcome = 1
else
    if quota_limit >= 0 then
        used = redis.call('INCR', KEYS[2])
        if used == 1 then
            -- the counter of a new period: it vanishes on its own soon after the period ends
            redis.call('PEXPIREAT', KEYS[2], quota_expire_at)
        end
    end
    if rate_limit >= 0 then
        -- members must be unique, and two admissions may share a microsecond
        local stamp = string.format('%s%06d', clock[1], tonumber(clock[2]))
        local member = stamp
        local suffix = in_window
        while redis.call('ZADD', KEYS[1], 'NX', now, member) == 0 do
            suffix = suffix + 1
            member = stamp .. '-' .. suffix
        end
        redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1)
        in_window = in_window + 1
    end
end

local wait = 0
if rate_limit >= 0 and in_window > 0 then
    -- the entry whose departure leaves limit-1 behind (more than limit may remain after a
    -- reload lowered the limit)
    local rank = in_window - rate_limit
    if rank < 0 then
        rank = 0
    end
    local entry = redis.call('ZRANGE', KEYS[1], rank, rank, 'WITHSCORES')
    wait = tonumber(entry[2]) + window - now
end

return {outcome, used, in_window, wait}
