-- Give back the quota units of one admission whose outcome does not count.
--
-- KEYS[1]  hash: the quota of the period the units were taken from
-- KEYS[2]  hash: the history of the UTC day the request was counted on
-- ARGV[1]  cost: the units taken
-- ARGV[2]  `born` of the quota hash when the units were taken (0: the plan had no quota)
-- ARGV[3]  `born` of the day's history hash then
-- ARGV[4]  the plan's name
--
-- A hash whose `born` differs is not the one the units went into (Redis restarted and lost
-- it, or it expired and was created again): it is left alone, so a refund can neither make a
-- count negative nor take units from requests admitted since. Nothing goes below zero.
-- Returns the units given back to the quota.

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
