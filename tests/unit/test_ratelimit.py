"""The log rate limiter: a burst per kind of line, then a count of what was held back."""

from twisted.logger import Logger

from arcbox_net.ratelimit import LimitedLog, RateLimiter


def test_a_burst_then_one_line_per_refill_with_the_count_held_back():
    limiter = RateLimiter(burst=3, interval=10.0)
    allowed = [limiter.allow("k", 100.0) for _ in range(10)]
    assert allowed == [0, 0, 0] + [None] * 7
    assert limiter.allow("k", 103.0) is None           # 0.9 of a token back
    assert limiter.allow("k", 104.0) == 8              # one token: says 8 were held back
    assert limiter.allow("other", 104.0) == 0          # kinds have their own budget
    assert limiter.suppressed == 8


def test_the_number_of_kinds_is_bounded():
    limiter = RateLimiter(burst=1, interval=1.0, max_keys=10)
    for i in range(1000):
        limiter.allow(i, 0.0)
    assert len(limiter._buckets) == 10


def test_limited_log_emits_the_suppressed_count():
    events = []
    now = [0.0]
    log = LimitedLog(Logger(namespace="t", observer=events.append), clock=lambda: now[0],
                     limiter=RateLimiter(burst=2, interval=10.0))
    for i in range(100):
        log.warn("no host socket for {target}", target=i)
    now[0] = 5.0
    log.warn("no host socket for {target}", target="last")
    assert [e["target"] for e in events] == [0, 1, "last"]
    assert events[-1]["suppressed"] == 98
    from twisted.logger import formatEvent
    assert formatEvent(events[-1]) == "no host socket for last (98 similar lines suppressed)"
