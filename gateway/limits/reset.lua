-- Reset the quota of one period: its use goes, its credit stays.
--
-- KEYS[1]  hash: the quota of the current period (see hit.lua)
--
-- The hash is born again. The units of the admissions before the reset went with it, so their
-- refunds, which name the old `born` (settle.lua), must find a counter that is not theirs and
-- take nothing from the admissions since. A period nobody has used yet has nothing to reset
-- and gets no hash (it would have no expiry).

local born = redis.call('HGET', KEYS[1], 'born')
if born then
    local clock = redis.call('TIME')
    local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
    if now <= tonumber(born) then
        -- the same microsecond (or a clock set back): still a new incarnation
        now = tonumber(born) + 1
    end
    redis.call('HDEL', KEYS[1], 'used')
    redis.call('HSET', KEYS[1], 'born', now)
end
return 0
