"""What the gateway learns of a Redis server's clock, and the deadlines it gives from it."""

from __future__ import annotations

from gateway.limits.redis_clock import DEADLINE_SHARE, RedisClock

# A server whose clock reads 1,000 s more than the loop's.
AHEAD = 1_000.0


def stamped(now: float, late: float = 0.0) -> int:
    """The server's time at loop time `now`, read `late` seconds after it stamped it."""
    return round((now - late + AHEAD) * 1_000_000)


def test_no_deadline_before_the_clock_is_known() -> None:
    assert RedisClock().deadline_us(5.0, 0.25) == 0


def test_the_deadline_is_a_share_of_the_timeout_on_the_servers_clock() -> None:
    clock = RedisClock()
    clock.learn(stamped(10.0), 10.0)
    expected = (20.0 + 0.25 * DEADLINE_SHARE + AHEAD) * 1_000_000
    assert abs(clock.deadline_us(20.0, 0.25) - expected) <= 1


def test_the_sample_read_soonest_after_its_stamp_wins_for_a_while() -> None:
    """Every sample falls short of the true offset by how late it was read: the largest is the
    best, and a later, lower one does not replace it (deadlines err early, never late)."""
    clock = RedisClock()
    clock.learn(stamped(10.0, late=0.005), 10.0)
    clock.learn(stamped(11.0, late=0.001), 11.0)
    clock.learn(stamped(12.0, late=0.050), 12.0)  # a reply read late, the loop busy
    best = clock.deadline_us(12.0, 0.0)
    assert abs(best - (12.0 - 0.001 + AHEAD) * 1_000_000) <= 1
    # ... until it is old: clocks are adjusted, so a sample is trusted for ten seconds.
    clock.learn(stamped(30.0, late=0.050), 30.0)
    assert abs(clock.deadline_us(30.0, 0.0) - (30.0 - 0.050 + AHEAD) * 1_000_000) <= 1


def test_a_new_server_starts_afresh() -> None:
    """After a failover the new master's clock may be behind the old one's."""
    clock = RedisClock()
    clock.learn(stamped(10.0), 10.0)
    behind = round((11.0 + AHEAD - 5.0) * 1_000_000)
    clock.learn(behind, 11.0, new_server=True)
    assert abs(clock.deadline_us(11.0, 0.0) - behind) <= 1
