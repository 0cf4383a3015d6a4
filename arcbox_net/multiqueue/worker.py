"""A queue worker: ``python -m arcbox_net.multiqueue.worker INDEX CONFIG LINK_KIND BUSY_POLL``.

It reads one TAP queue (fd 3) and runs a stack of its own that serves only the
TCP connections the guest opens on that queue (``QueueDispatcher``); every
other frame goes to the main process over stdout, with its stats,
connections, events, captured frames and log lines (``WorkerChannel``).
"""

import ipaddress
import json
import os
import signal
import sys

from twisted.internet import protocol

from ..dispatch import FrameDispatcher
from ..wire.ethernet import mac_from_str
from ..wire.tcp import CONTROL_FLAGS, SYN
from .messages import (CAPTURED, EVENT, LOG, OPTIONS, READY, RELAY, SNAPSHOT,
                       SNAPSHOT_INTERVAL, MessageReader, encode)


class QueueDispatcher(FrameDispatcher):
    """A worker's dispatcher: keeps guest-opened TCP, relays every other frame."""

    def __init__(self, config, link=None):
        super().__init__(config, link)
        #: Callable(frame) taking the frames this process does not serve.
        self.relay = None
        #: The TCP NAT's connection table (set once the stack has built it).
        self.tcp_connections = {}
        self.relayed = 0

    def frames_received(self, frames):
        mine = []
        for frame in frames:
            if self._serves(frame):
                mine.append(frame)
            else:
                self.relayed += 1
                self.relay(frame)
        if mine:
            super().frames_received(mine)

    def _serves(self, frame):
        # IPv4 carrying TCP, long enough for its ports and flags (IPv6 goes to
        # the main process). A fragment is dropped and counted by whichever
        # dispatcher gets it.
        if len(frame) < 54 or frame[12] != 8 or frame[13] != 0 or frame[23] != 6:
            return False
        tcp_at = 14 + (frame[14] & 0x0F) * 4
        if len(frame) < tcp_at + 20:
            return False
        if frame[tcp_at + 13] & CONTROL_FLAGS == SYN:
            return True
        key = (bytes(frame[26:30]), (frame[tcp_at] << 8) | frame[tcp_at + 1],
               bytes(frame[30:34]), (frame[tcp_at + 2] << 8) | frame[tcp_at + 3])
        return key in self.tcp_connections


def _worker_stack_class():
    from ..stack import NetworkStack

    class QueueWorkerStack(NetworkStack):
        dispatcher_class = QueueDispatcher

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # ICMP never reaches a worker (relayed): no ping or raw socket here.
            self.icmp.forward = None

        def _add_ipv6(self):
            # IPv6 frames are relayed to the main process, which alone sends
            # router advertisements and serves NDP and DHCPv6.
            self.icmp6 = self.dhcp6 = None

        def stats(self):
            stats = super().stats()
            stats["relayed"] = self.dispatcher.relayed
            return stats

    return QueueWorkerStack


class _CaptureRelay:
    """A worker's stand-in for the pcap file: copies frames to the main process."""

    active = True

    def __init__(self, channel):
        self.channel = channel

    def write(self, frame):
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            frame = b"".join(frame)
        self.channel.send(CAPTURED, bytes(frame))

    def close(self):
        self.active = False


class WorkerChannel(protocol.Protocol):
    """The worker's end of the pipe pair: options in, everything else out."""

    def __init__(self, stack, reactor):
        self.stack = stack
        self.reactor = reactor
        self._reader = MessageReader()
        self._unsubscribe = None
        self._last_moved = None

    def connectionMade(self):
        self.stack.dispatcher.relay = lambda frame: self.send(RELAY, bytes(frame))
        from twisted.internet.task import LoopingCall
        self._snapshots = LoopingCall(self._snapshot)
        self._snapshots.clock = self.reactor
        self._snapshots.start(SNAPSHOT_INTERVAL, now=False)
        self.send(READY, str(os.getpid()).encode())

    def send(self, kind, payload):
        self.transport.write(encode(kind, payload))

    def dataReceived(self, data):
        try:
            messages = self._reader.feed(data)
        except ValueError:
            self.transport.loseConnection()
            return
        for kind, payload in messages:
            if kind == OPTIONS:
                self._apply(json.loads(payload))

    def _apply(self, options):
        if options.get("events") and self._unsubscribe is None:
            self._unsubscribe = self.stack.subscribe(
                lambda kind, details: self.send(EVENT, json.dumps([kind, details]).encode()))
        elif not options.get("events") and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        dispatcher = self.stack.dispatcher
        bindings = options.get("bindings")
        if bindings is not None:
            framer = dispatcher.framer
            dispatcher.neighbours.replace_bindings(
                [(ipaddress.ip_address(a).packed, mac_from_str(m), left)
                 for a, m, left in bindings], framer.clock())
        if options.get("capture"):
            if dispatcher.capture is None:
                dispatcher.capture = _CaptureRelay(self)
        else:
            dispatcher.capture = None

    def _snapshot(self):
        stats = self.stack.stats()
        connections = self.stack.connections()
        moved = (stats["frames_in"], stats["frames_out"], stats["relayed"])
        if moved == self._last_moved and not connections:
            return
        self._last_moved = moved
        self.send(SNAPSHOT, json.dumps({"stats": stats, "connections": connections}).encode())

    def connectionLost(self, reason):
        # The main process closed our stdin, or went away: this worker is done.
        if self._snapshots.running:
            self._snapshots.stop()
        if self.reactor.running:
            self.reactor.stop()


def _log_to_channel(channel):
    """Send this process's log events to the main process (which logs them)."""
    from twisted.logger import formatEvent, globalLogBeginner

    def observer(event):
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        level = event.get("log_level")
        try:
            channel.send(LOG, json.dumps({"level": level.name if level else "info",
                                          "text": text}).encode())
        except Exception:
            pass

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False,
                                     discardBuffer=True)


def serve_queue(argv):
    """``python -m arcbox_net.multiqueue.worker INDEX CONFIG_JSON LINK_KIND BUSY_POLL``,
    with the queue's fd as fd 3 and the channel on stdin/stdout."""
    index, config_json, link_kind, busy_poll = argv
    # Ctrl-C reaches the whole process group: the main process stops us (EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep stdout for the channel; a stray print goes to stderr instead.
    channel_fd = os.dup(1)
    os.dup2(2, 1)
    from ..reactor import install
    reactor = install(float(busy_poll))
    from ..allocator import tune
    from ..config import StackConfig
    from ..link.tap import OFFLOAD_CHOICES, TapLink
    from twisted.internet.stdio import StandardIO

    config = StackConfig(**json.loads(config_json))
    # The TUN_F_* flags queue 0 got, by name: with and without TCPv6 GSO.
    offloads = {"vnet-offload6": OFFLOAD_CHOICES[0], "vnet-offload": OFFLOAD_CHOICES[1]}
    link = TapLink.from_fds([3], link_kind != "plain", offloads.get(link_kind, 0),
                            f"tap queue {index}", config.mtu, reactor)
    stack = _worker_stack_class()(link, config, reactor=reactor)
    stack.dispatcher.tcp_connections = stack.tcp.connections
    # IP idents of this process start elsewhere than the main process's.
    stack.dispatcher.framer.seed_ident(int(index) * 0x1000)
    tune()
    channel = WorkerChannel(stack, reactor)
    _log_to_channel(channel)
    stack.whenLinkLost().addCallback(lambda _: reactor.running and reactor.stop())
    reactor.callWhenRunning(StandardIO, channel, stdin=0, stdout=channel_fd, reactor=reactor)
    reactor.callWhenRunning(stack.startService)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(serve_queue(sys.argv[1:]))
