"""The epoll reactor, minus the per-event logging context, plus adaptive polling.

Twisted's ``EPollReactor.doPoll`` wraps every ready descriptor in
``log.callWithLogger``: a ``logPrefix()`` call and a context-stack push and
pop that only the legacy ``log.msg`` "system" field reads. A request/response
round trip through the stack wakes the reactor twice, so that wrapper is paid
on the latency path for nothing this program uses. ``LeanEPollReactor`` is
otherwise Twisted's reactor: the same poller, timers, threads and
``_doReadOrWrite``, which already turns a reader's exception into a logged
disconnect. Those private parts (``_poller``, ``_selectables``,
``_doReadOrWrite``, ``doIteration = doPoll``) and the ``doPoll`` copied here are
checked against the installed Twisted by tests/unit/test_twisted_internals.py.

Adaptive polling (``busy_poll``; off unless given, twistd gives 200 us): before
blocking in ``epoll_wait``, keep polling without a timeout for a window that
adapts to how long the reactor has recently sat idle, as QEMU's event loop
(poll-max-ns) and KVM's halt polling do. In a request/response exchange the
next event comes a few tens of microseconds after the last; a blocked process
(and, in a VM, a halted vCPU) takes longer than that to wake, and wakes with
cold caches. The
window grows (doubling) when a blocking wait ended within ``busy_poll`` and
shrinks (halving) when it did not, so an idle or slow-paced stack blocks at
once and a bulk transfer never waits at all; only ping-pong traffic pays CPU
for the shorter round trip. Each empty poll yields the CPU to any runnable
task (``sched_yield``), so the peer being waited for is not held up when it
shares our CPU.

``twistd arcbox-net`` installs it unless ``-r/--reactor`` chose one; an
embedding program calls ``install()`` before anything imports
``twisted.internet.reactor``, or keeps its own reactor (the stack works on any
``IReactorFDSet`` reactor; this one is only faster).
"""

import os
import sys
import time

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

from .ratelimit import LimitedLog

_log = Logger()
_limited_log = LimitedLog(_log)

#: The window never starts below this once it grows from zero (seconds).
_WINDOW_START = 16e-6
#: The longest ``busy_poll`` accepted (seconds).
BUSY_POLL_MAX = 0.01


class LeanEPollReactor(EPollReactor):
    """``EPollReactor`` without per-event log contexts, with adaptive polling."""

    def __init__(self, busy_poll=0.0):
        super().__init__()
        self._window = 0.0
        self.busy_poll = busy_poll

    @property
    def busy_poll(self):
        """The longest polling window, in seconds (0 turns polling off)."""
        return self._busy_poll

    @busy_poll.setter
    def busy_poll(self, seconds):
        seconds = float(seconds)
        if not 0.0 <= seconds <= BUSY_POLL_MAX:
            raise ValueError(f"busy_poll must be between 0 and {BUSY_POLL_MAX} s")
        self._busy_poll = seconds
        self._window = min(self._window, seconds)

    def doPoll(self, timeout):
        poll = self._poller.poll
        n = len(self._selectables)
        if timeout is None:
            timeout = -1
        if self._busy_poll and timeout != 0:
            events = self._poll_adaptively(poll, n, timeout)
        else:
            # EINTR is retried by Python itself (PEP 475); other errors are bugs.
            events = poll(timeout, n)
        selectables = self._selectables
        drdw = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                drdw(selectable, fd, event)
            except Exception:
                _limited_log.failure("while handling {selectable!r}", selectable=selectable)

    doIteration = doPoll

    def _poll_adaptively(self, poll, n, timeout):
        clock = time.monotonic
        start = clock()
        window = self._window
        if window:
            if 0 < timeout < window:
                window = timeout
            end = start + window
            yield_cpu = os.sched_yield
            while True:
                events = poll(0, n)
                if events:
                    return events
                if clock() >= end:
                    break
                yield_cpu()
            if timeout > 0:
                timeout = max(0.0, timeout - (clock() - start))
        events = poll(timeout, n)
        if events:  # a timer's deadline ending the wait says nothing of the traffic
            self._window = next_window(self._window, clock() - start, self._busy_poll)
        return events


def next_window(window, waited, limit):
    """The polling window after a wait of ``waited`` seconds that had to block.

    Had it ended within ``limit``, a longer window would have caught the event
    without sleeping: double it (from a small start). Otherwise halve it,
    down to zero, so a stack whose traffic has gone quiet stops polling after a
    few wakeups.
    """
    if waited <= limit:
        return min(limit, max(window * 2, _WINDOW_START))
    if window > 2 * _WINDOW_START:
        return window / 2
    return 0.0


def install(busy_poll=0.0):
    """Install ``LeanEPollReactor`` as the global reactor; returns it."""
    from twisted.internet.main import installReactor

    reactor = LeanEPollReactor(busy_poll)
    installReactor(reactor)
    return reactor


def install_unless_chosen(busy_poll=0.0):
    """Install it unless a reactor is installed already (twistd's -r); the reactor
    installed, or None."""
    if "twisted.internet.reactor" in sys.modules:
        return None
    return install(busy_poll)
