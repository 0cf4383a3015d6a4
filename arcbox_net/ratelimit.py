"""Log lines a guest cannot flood: a sans-I/O rate limiter and a Logger wrapper.

Anything a guest can make happen once per frame or per flow (a MAC moving, a
host socket refused, a spoofed source) may be logged at most ``burst`` times
per ``interval`` seconds per kind of line; the lines held back are counted
and the next line of that kind that is let through says how many there were.
The counters in ``stats()`` carry the detail; the log only has to say that
something is happening.
"""

import time

from twisted.logger import Logger

#: Default budget: this many lines of one kind per interval (seconds).
BURST = 5
INTERVAL = 10.0
#: Kinds of line tracked at once; beyond it the stalest kind is forgotten.
MAX_KEYS = 1024
#: Lines held back by every limiter of this process (``/stats`` counter
#: ``log-lines-suppressed``).
_suppressed_total = [0]


def suppressed_total():
    return _suppressed_total[0]


class RateLimiter:
    """Token bucket per key, time passed in: ``allow(key, now)`` is None when
    the line must be held back, else how many lines of that key were held back
    since the last one let through."""

    def __init__(self, burst=BURST, interval=INTERVAL, max_keys=MAX_KEYS):
        if burst < 1 or interval <= 0:
            raise ValueError("a rate limit needs burst >= 1 and interval > 0")
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._buckets = {}   # key -> [tokens, last refill time, held back]
        #: Lines held back in total, over every key.
        self.suppressed = 0

    def allow(self, key, now):
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                # Forget the kind idle longest (dicts keep insertion order;
                # a kind let through is moved to the end below).
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[key] = [float(self.burst), now, 0]
        else:
            elapsed = now - bucket[1]
            if elapsed > 0:
                bucket[0] = min(float(self.burst),
                                bucket[0] + elapsed * self.burst / self.interval)
                bucket[1] = now
        if bucket[0] < 1.0:
            bucket[2] += 1
            self.suppressed += 1
            _suppressed_total[0] += 1
            return None
        bucket[0] -= 1.0
        held, bucket[2] = bucket[2], 0
        self._buckets[key] = self._buckets.pop(key)
        return held


class LimitedLog:
    """A twisted.logger.Logger whose lines are rate-limited per ``key``.

    ``log.warn("no-socket", "no host socket for {flow}", flow=...)`` emits
    the line at most ``burst`` times per interval; a line that follows held-back
    ones ends with "(N similar lines suppressed)" and carries ``suppressed=N``.
    The key defaults to the format string: one budget per kind of line.
    """

    def __init__(self, logger=None, clock=time.monotonic, limiter=None):
        self.logger = logger if logger is not None else Logger()
        self.clock = clock
        self.limiter = limiter if limiter is not None else RateLimiter()

    @property
    def suppressed(self):
        return self.limiter.suppressed

    def _emit(self, method, key, fmt, kwargs):
        held = self.limiter.allow(key if key is not None else fmt, self.clock())
        if held is None:
            return False
        if held:
            fmt = fmt + " ({suppressed} similar lines suppressed)"
        getattr(self.logger, method)(fmt, suppressed=held, **kwargs)
        return True

    def info(self, fmt, key=None, **kwargs):
        return self._emit("info", key, fmt, kwargs)

    def warn(self, fmt, key=None, **kwargs):
        return self._emit("warn", key, fmt, kwargs)

    def error(self, fmt, key=None, **kwargs):
        return self._emit("error", key, fmt, kwargs)

    def failure(self, fmt, failure=None, key=None, **kwargs):
        """A traceback, rate-limited like any line (key: the format)."""
        held = self.limiter.allow(key if key is not None else fmt, self.clock())
        if held is None:
            return False
        if held:
            fmt = fmt + " ({suppressed} similar lines suppressed)"
        self.logger.failure(fmt, failure, suppressed=held, **kwargs)
        return True
