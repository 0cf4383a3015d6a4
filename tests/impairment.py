"""A faulty link for tests: drop, duplicate, reorder and delay frames, both ways, seeded.

``ImpairedLink`` wraps a real link (an ILink) between the stack and it: frames
the stack sends pass the ``to_guest`` impairment before the link, frames the
link reads pass ``from_guest`` before the stack. An ``Impairment`` is netem's
model: each frame is dropped with probability ``loss``, else sent twice with
``duplicate``; with a ``delay``, a frame goes at once with probability
``reorder`` and after ``delay`` seconds otherwise, so the undelayed ones
overtake those ahead of them. Every decision comes from one ``random.Random``
per direction: a seed gives the same pattern of faults for the same frames.
"""

import random
from collections import Counter

from zope.interface import implementer

from arcbox_net.interfaces import ILink


class Impairment:
    def __init__(self, seed, loss=0.0, duplicate=0.0, reorder=0.0, delay=0.0):
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.counts = Counter()

    def decide(self):
        """For one frame: the delays (seconds) of its copies; () drops it."""
        rng = self.rng
        self.counts["frames"] += 1
        if rng.random() < self.loss:
            self.counts["dropped"] += 1
            return ()
        copies = 1
        if rng.random() < self.duplicate:
            self.counts["duplicated"] += 1
            copies = 2
        out = []
        for _ in range(copies):
            if self.delay and rng.random() >= self.reorder:
                out.append(self.delay)
            else:
                if self.delay:
                    self.counts["reordered"] += 1
                out.append(0.0)
        return out


def _copy(frame):
    """A frame that outlives this call (the link may reuse its buffers)."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return bytes(frame)
    return b"".join(bytes(b) for b in frame)


@implementer(ILink)
class ImpairedLink:
    """``inner`` with ``to_guest`` / ``from_guest`` impairments (either may be None)."""

    def __init__(self, inner, reactor, to_guest=None, from_guest=None):
        self.inner = inner
        self.reactor = reactor
        self.to_guest = to_guest
        self.from_guest = from_guest
        self._sink = None

    def __getattr__(self, name):  # description, mtu, capabilities, drops, counters...
        return getattr(self.inner, name)

    @property
    def capabilities(self):
        return self.inner.capabilities

    def start(self, sink):
        self._sink = sink
        self.inner.start(self)

    def stop(self):
        self.inner.stop()

    # -- the stack's side: frames to the guest

    def send_frame(self, frame, vnet_header=None):
        imp = self.to_guest
        if imp is None:
            self._send(frame, vnet_header)
            return
        delays = imp.decide()
        if not delays:
            return
        if any(delays):
            frame = _copy(frame)
            vnet_header = None if vnet_header is None else bytes(vnet_header)
        for d in delays:
            if d:
                self.reactor.callLater(d, self._send, frame, vnet_header)
            else:
                self._send(frame, vnet_header)

    def _send(self, frame, vnet_header):
        if vnet_header is None:
            self.inner.send_frame(frame)
        else:
            self.inner.send_frame(frame, vnet_header)

    # -- the link's side: frames from the guest (we are the inner link's sink)

    def frames_received(self, frames):
        imp = self.from_guest
        if imp is None:
            self._sink.frames_received(frames)
            return
        now = []
        for frame in frames:
            for d in imp.decide():
                if d:
                    self.reactor.callLater(d, self._deliver, _copy(frame))
                else:
                    now.append(frame)
        if now:
            self._sink.frames_received(now)

    def _deliver(self, frame):
        self._sink.frames_received([frame])

    def link_lost(self, reason):
        self._sink.link_lost(reason)
