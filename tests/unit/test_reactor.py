"""arcbox_net.reactor: the epoll reactor twistd runs the stack on.

Unit tests drive ``doPoll`` of a private reactor instance by hand (never run,
never installed) with pipes as the descriptors; the real-guest tests check what
``twistd arcbox-net`` installs and that ``-r`` still wins.
"""

import os
import threading
import time

import pytest
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from arcbox_net.reactor import _WINDOW_START, LeanEPollReactor, next_window


@implementer(IReadDescriptor)
class PipeReader:
    """Reads its pipe on doRead; ``fail=True`` raises instead."""

    def __init__(self, fail=False):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.fail = fail
        self.data = b""
        self.lost = []

    def fileno(self):
        return self.r

    def doRead(self):
        if self.fail:
            raise RuntimeError("reader bug")
        self.data += os.read(self.r, 4096)

    def connectionLost(self, reason):
        self.lost.append(reason)

    def logPrefix(self):
        return "PipeReader"

    def close(self):
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def lean():
    reactor = LeanEPollReactor(busy_poll=200e-6)
    readers = []

    def reader(**kwargs):
        r = PipeReader(**kwargs)
        readers.append(r)
        reactor.addReader(r)
        return r

    yield reactor, reader
    for r in readers:
        if r.r in reactor._selectables:
            reactor.removeReader(r)
        r.close()
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        reactor.removeReader(waker)
        waker.connectionLost(None)
    reactor._poller.close()


def test_next_window_doubles_up_to_the_limit_while_waits_are_short():
    limit = 200e-6
    window, seen = 0.0, []
    for _ in range(8):
        window = next_window(window, 50e-6, limit)
        seen.append(window)
    assert seen[0] == _WINDOW_START
    assert seen[1] == 2 * _WINDOW_START
    assert max(seen) == limit and seen[-1] == limit


def test_next_window_halves_to_zero_once_waits_are_long():
    window, steps = 200e-6, 0
    while window:
        shorter = next_window(window, 5e-3, 200e-6)
        assert shorter < window
        window, steps = shorter, steps + 1
    assert steps <= 5


def test_events_reach_readers_without_a_window(lean):
    reactor, reader = lean
    a, b = reader(), reader()
    os.write(a.w, b"one")
    os.write(b.w, b"two")
    reactor.doPoll(0.5)
    assert (a.data, b.data) == (b"one", b"two")


def test_a_prompt_event_grows_the_window_and_polling_finds_the_next(lean):
    reactor, reader = lean
    a = reader()
    assert reactor._window == 0.0
    os.write(a.w, b"x")
    reactor.doPoll(0.5)                  # blocking wait, answered at once
    assert a.data == b"x"
    assert reactor._window == _WINDOW_START
    os.write(a.w, b"y")
    reactor.doPoll(0.5)                  # caught while polling: the window stays
    assert a.data == b"xy"
    assert reactor._window == _WINDOW_START


def test_a_late_event_shrinks_the_window(lean):
    reactor, reader = lean
    a = reader()
    reactor._window = 200e-6
    writer = threading.Timer(0.02, os.write, (a.w, b"late"))
    writer.start()
    try:
        reactor.doPoll(2.0)
    finally:
        writer.join()
    assert a.data == b"late"
    assert reactor._window == 100e-6


def test_a_timer_deadline_leaves_the_window_alone(lean):
    reactor, reader = lean
    reader()
    reactor._window = 64e-6
    started = time.monotonic()
    reactor.doPoll(0.01)                 # nothing comes: the timeout ends the wait
    assert time.monotonic() - started >= 0.009
    assert reactor._window == 64e-6


def test_busy_poll_zero_never_polls(lean):
    reactor, reader = lean
    a = reader()
    reactor.busy_poll = 0
    os.write(a.w, b"x")
    reactor.doPoll(0.5)
    assert a.data == b"x" and reactor._window == 0.0
    with pytest.raises(ValueError):
        reactor.busy_poll = 0.5


def test_a_failing_reader_is_dropped_and_the_others_still_served(lean):
    reactor, reader = lean
    bad, good = reader(fail=True), reader()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        os.write(bad.w, b"x")
        os.write(good.w, b"y")
        reactor.doPoll(0.5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert good.data == b"y"
    assert len(bad.lost) == 1 and bad.r not in reactor._selectables
    failures = [e.get("log_failure") or e.get("failure") for e in events]
    assert any(f is not None and f.check(RuntimeError) for f in failures), events
