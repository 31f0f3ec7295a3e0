-- Give back the quota units of one admission whose outcome does not count.
--
-- KEYS[1]  hash: the quota of the period the units were taken from
-- KEYS[2]  hash: the history of the UTC day the request was counted on
-- ARGV[1]  cost: the units taken
-- ARGV[2]  `born` of the quota hash when the units were taken (0: the plan had no quota)
-- ARGV[3]  `born` of the day's history hash then
-- ARGV[4]  the plan's name
-- ARGV[5]  the Redis time (microseconds) after which the gateway no longer waits for this
--          reply, or 0: a refund that runs later (a stalled Redis waking up) gives nothing
--          back, so that one the gateway counted as failed has truly not been applied
--
-- A hash whose `born` differs is not the one the units went into (Redis restarted and lost
-- it, or it expired and was created again): it is left alone, so a refund can neither make a
-- count negative nor take units from requests admitted since. Nothing goes below zero.
-- Returns the units given back to the quota, or -1 when it ran after its deadline (nothing
-- was looked at or given back).

local deadline = tonumber(ARGV[5])
if deadline > 0 then
    local clock = redis.call('TIME')
    if tonumber(clock[1]) * 1000000 + tonumber(clock[2]) > deadline then
        return -1
    end
end

local cost = tonumber(ARGV[1])
local returned = 0

local function take_back(key, born, field)
    local current = redis.call('HMGET', key, 'born', field)
    if current[1] == false or tonumber(current[1]) ~= tonumber(born) then
        return 0
    end
    local units = math.min(cost, tonumber(current[2] or 0))
    if units > 0 then
        redis.call('HINCRBY', key, field, -units)
    end
    return units
end

if ARGV[2] ~= '0' then
    returned = take_back(KEYS[1], ARGV[2], 'used')
end
take_back(KEYS[2], ARGV[3], 'u:' .. ARGV[4])
return returned
