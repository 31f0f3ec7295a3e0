-- Move the quota units of one admission once its outcome is known: give some or all of them
-- back (an outcome the plan refunds, or a cost its upstream reported below what admission
-- took) or take more (a reported cost above it; no limit is checked: the units were used, so
-- the quota may go above its limit until the period ends).
--
-- KEYS[1]  hash: the quota of the period the units were taken from
-- KEYS[2]  hash: the history of the UTC day the request was counted on
-- ARGV[1]  units: below 0 gives back that many (never below zero), above 0 takes that many more
-- ARGV[2]  `born` of the quota hash when the units were taken (0: the plan had no quota)
-- ARGV[3]  `born` of the day's history hash then
-- ARGV[4]  the plan's name
-- ARGV[5]  the Redis time (microseconds) after which the gateway no longer waits for this
--          reply, or 0: a call that runs later (a stalled Redis waking up) moves nothing, so
--          that one the gateway counted as failed has truly not been applied
--
-- A hash whose `born` differs is not the one the units went into (Redis restarted and lost
-- it, or it expired and was created again): it is left alone, so a settlement can neither make
-- a count negative nor move units of requests admitted since. Returns the units moved on the
-- quota (given back or taken, as a number >= 0), or -1 when it ran after its deadline (nothing
-- was looked at or moved).

local deadline = tonumber(ARGV[5])
if deadline > 0 then
    local clock = redis.call('TIME')
    if tonumber(clock[1]) * 1000000 + tonumber(clock[2]) > deadline then
        return -1
    end
end

local units = tonumber(ARGV[1])

local function move(key, born, field)
    local current = redis.call('HMGET', key, 'born', field)
    if current[1] == false or tonumber(current[1]) ~= tonumber(born) then
        return 0
    end
    local moved = units
    if units < 0 then
        moved = -math.min(-units, tonumber(current[2] or 0))
    end
    if moved ~= 0 then
        redis.call('HINCRBY', key, field, string.format('%d', moved))
    end
    return math.abs(moved)
end

local moved = 0
if ARGV[2] ~= '0' then
    moved = move(KEYS[1], ARGV[2], 'used')
end
move(KEYS[2], ARGV[3], 'u:' .. ARGV[4])
return moved
