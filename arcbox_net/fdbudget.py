"""How many file descriptors the guest may make the stack hold.

Every guest TCP connection and UDP or ICMP flow holds one host socket, so
a guest that opens enough of them would use up the process's descriptors,
and then the control API, DNS over TCP and the listeners of port forwards
could no longer accept anything. The budget keeps ``RESERVE`` descriptors
(plus what was open at start) out of the guest's reach: beyond it a new TCP
connection gets an RST (``tcp-fd-exhausted``) and a new UDP flow first
takes the place of the least recently active one (``udp-fd-evicted``).
From ``PRESSURE`` of the budget on, UDP flows idle for more than a quarter
of their timeout (at least ``MIN_IDLE`` seconds) are closed before a new
one opens, so short-lived DNS-style flows make room on their own.

Sans-I/O: the limit and the baseline are passed in (``for_process`` reads
them from the process); the users are callables returning how many
descriptors they hold now, so nothing is counted twice or leaks.
"""

import math
import os
import resource

#: Descriptors kept for the stack itself: API clients, DNS over TCP,
#: accepted forward clients, log files, the link's own.
RESERVE = 64
#: Fraction of the budget from which idle UDP flows are reaped early.
PRESSURE = 0.75
#: Reaped early only after this many idle seconds.
MIN_IDLE = 5.0


class FdBudget:
    def __init__(self, limit=math.inf, baseline=0, reserve=RESERVE):
        self.capacity = max(0, limit - baseline - reserve)
        self._users = []

    @classmethod
    def for_process(cls, reserve=RESERVE):
        """The budget of this process now: its soft RLIMIT_NOFILE less what
        is open already and the reserve."""
        try:
            soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            return cls()
        if soft == resource.RLIM_INFINITY:
            return cls()
        try:
            baseline = len(os.listdir("/proc/self/fd"))
        except OSError:
            baseline = 0
        return cls(soft, baseline, reserve)

    def add_user(self, count):
        """``count()`` says how many descriptors that user holds now."""
        self._users.append(count)

    def in_use(self):
        return sum(count() for count in self._users)

    def room(self):
        """Descriptors the guest may still take (<= 0: none)."""
        return self.capacity - self.in_use()

    def under_pressure(self):
        return self.capacity != math.inf and self.in_use() >= PRESSURE * self.capacity

    def to_json(self):
        capacity = None if self.capacity == math.inf else self.capacity
        return {"capacity": capacity, "in_use": self.in_use()}
