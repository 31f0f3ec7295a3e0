-- Take more quota units for one admission, after its upstream reported that it cost more than
-- the units taken at admission (a route's cost_header). No limit is checked: the units were
-- used already, so the quota may go above its limit, and later requests wait for the next
-- period (or credit).
--
-- KEYS[1]  hash: the quota of the period the admission's units went into
-- KEYS[2]  hash: the history of the UTC day the request was counted on
-- ARGV[1]  units to take (>= 1)
-- ARGV[2]  `born` of the quota hash at admission (0: the plan had no quota)
-- ARGV[3]  `born` of the day's history hash then
-- ARGV[4]  the plan's name
-- ARGV[5]  the Redis time (microseconds) after which the gateway no longer waits for this
--          reply, or 0: a charge that runs later (a stalled Redis waking up) takes nothing,
--          so that one the gateway counted as failed has truly not been applied
--
-- A hash whose `born` differs is not the one the admission counted in (Redis restarted and
-- lost it, or its period ended and a new one began): it is left alone, so a late report never
-- charges a period the request did not belong to. Returns the units added to the quota, or -1
-- when it ran after its deadline (nothing was looked at or taken).

local deadline = tonumber(ARGV[5])
if deadline > 0 then
    local clock = redis.call('TIME')
    if tonumber(clock[1]) * 1000000 + tonumber(clock[2]) > deadline then
        return -1
    end
end

local units = ARGV[1]

local function add(key, born, field)
    local current = redis.call('HGET', key, 'born')
    if current == false or tonumber(current) ~= tonumber(born) then
        return 0
    end
    redis.call('HINCRBY', key, field, units)
    return tonumber(units)
end

local taken = 0
if ARGV[2] ~= '0' then
    taken = add(KEYS[1], ARGV[2], 'used')
end
add(KEYS[2], ARGV[3], 'u:' .. ARGV[4])
return taken
