"""``--queues N``: a multi-queue TAP served by N processes, one queue each.

Theory of operation. One Python process tops out at about one CPU; with
several busy connections the stack is CPU-bound while the machine has CPUs
to spare. A multi-queue TAP (IFF_MULTI_QUEUE) gives one fd per queue, and the
kernel keeps each guest flow on one queue: a flow the stack has written goes
to the queue it was written on (the TAP's flow table), any other flow goes to
a queue chosen by its hash. So a connection the guest opens stays with the
process that saw its SYN, for its whole life.

The main process (the NetworkStack the user runs) reads queue 0 and keeps
everything that has state worth sharing: DHCP leases, UDP and ICMP flows,
DNS over UDP, port forwards, the control API, the pcap file. Each worker
process reads one other queue and runs a stack of its own, but serves only
TCP connections the guest opens (a SYN, then the segments of connections it
holds). Every other frame it receives is relayed to the main process, which
handles it as if it had come from its own queue; the main process's answer
then pulls the flow onto queue 0. That also covers a forwarded connection
whose flow-table entry expired while idle (the kernel then hashes it, maybe
to a worker's queue).

Main and workers talk over the worker's stdin/stdout: messages of a 4-byte
length, a type byte and a payload. Workers send their stats and connections
once a second when anything moved (``stack.stats()`` and
``stack.connections()`` merge the latest), TCP events while someone
subscribes, copies of their frames while a capture runs, and their log.

All queues are opened, and so attached, before anything is read: frames for a
worker that is still starting wait in its queue (the kernel's queue of
txqueuelen frames). Detaching a queue later would renumber the others and
move live flows, so a worker that exits ends the whole stack (logged, as when
the VM's link goes), which its supervisor restarts.
"""

import json
import os
import signal
import struct
import sys

from twisted.internet import defer, protocol
from twisted.logger import Logger

from .dispatch import FrameDispatcher
from .tcp.nat import _PURE_SYN_MASK
from .wire.tcp import SYN

_LENGTH = struct.Struct("!I")

#: Worker -> main message types.
READY, RELAY, CAPTURED, EVENT, SNAPSHOT, LOG = b"Y", b"F", b"C", b"E", b"S", b"L"
#: Main -> worker: the options (events, capture) as JSON.
OPTIONS = b"O"

#: Longest message (a snapshot of thousands of connections is a few MB).
MAX_MESSAGE = 64 << 20
#: Seconds between a worker's snapshots (only sent when something moved).
SNAPSHOT_INTERVAL = 1.0
#: Seconds a stopping worker gets before SIGKILL.
STOP_GRACE = 3.0


def encode(kind, payload=b""):
    return _LENGTH.pack(len(payload) + 1) + kind + payload


class MessageReader:
    """Cuts a byte stream into (kind, payload) messages."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data):
        buf = self._buffer
        buf += data
        messages = []
        start = 0
        while len(buf) - start >= 4:
            (length,) = _LENGTH.unpack_from(buf, start)
            if not 1 <= length <= MAX_MESSAGE:
                raise ValueError(f"bad message length {length}")
            end = start + 4 + length
            if end > len(buf):
                break
            messages.append((bytes(buf[start + 4:start + 5]), bytes(buf[start + 5:end])))
            start = end
        del buf[:start]
        return messages


# -- the main process's side


class QueueWorkers:
    """Starts a worker process per extra queue fd and merges what they report."""

    log = Logger()

    def __init__(self, stack, fds, reactor, link_kind="vnet-offload", busy_poll=0.0):
        self.stack = stack
        self.reactor = reactor
        self._fds = list(fds)
        #: "vnet-offload", "vnet" (header, no offloads) or "plain": as queue 0.
        self._link_kind = link_kind
        self._busy_poll = busy_poll
        self.workers = []
        self._stopping = False
        # A capture or subscribers may exist before the workers do.
        self._options = {"events": bool(stack._subscribers),
                         "capture": stack.dispatcher.capture is not None}

    def start(self):
        """Spawn the workers; a Deferred that fires once all are serving, or
        fails if one exits first."""
        config = json.dumps(self.stack.config.to_json() | {"forwards": []})
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        ready = []
        for index, fd in enumerate(self._fds, start=1):
            worker = WorkerProcess(self, index)
            args = [sys.executable, "-m", "arcbox_net.multiqueue", str(index), config,
                    self._link_kind, repr(self._busy_poll)]
            self.reactor.spawnProcess(worker, sys.executable, args, env=env,
                                      childFDs={0: "w", 1: "r", 2: 2, 3: fd})
            os.close(fd)  # the worker holds the queue now
            self.workers.append(worker)
            ready.append(worker.ready)
        self._fds = []
        return defer.gatherResults(ready, consumeErrors=True).addCallback(lambda _: None)

    def stop(self):
        self._stopping = True
        for worker in self.workers:
            worker.stop()

    def set_options(self, **options):
        self._options.update(options)
        for worker in self.workers:
            worker.send_options(self._options)

    # -- what workers say

    def relayed(self, frame):
        self.stack.dispatcher.frames_received([frame])

    def captured(self, frame):
        capture = self.stack.dispatcher.capture
        if capture is not None:
            capture.write(frame)

    def ended(self, worker, reason):
        if self._stopping:
            return
        self.log.error("queue worker {index} (pid {pid}) exited: {reason}; stopping",
                       index=worker.index, pid=worker.pid, reason=reason)
        self.stack._link_lost(f"queue worker {worker.index} exited: {reason}")

    # -- merged views

    def merge_stats(self, stats):
        """Add the workers' latest counters to the main process's stats."""
        queues = [{"queue": 0, "pid": os.getpid(), "frames_in": stats["frames_in"],
                   "frames_out": stats["frames_out"]}]
        for worker in self.workers:
            theirs = (worker.snapshot or {}).get("stats")
            queues.append({"queue": worker.index, "pid": worker.pid,
                           "frames_in": theirs["frames_in"] if theirs else 0,
                           "frames_out": theirs["frames_out"] if theirs else 0,
                           "relayed": theirs.get("relayed", 0) if theirs else 0})
            if not theirs:
                continue
            stats["frames_in"] += theirs["frames_in"]
            stats["frames_out"] += theirs["frames_out"]
            for key in ("drops", "counters"):
                for name, n in theirs[key].items():
                    stats[key][name] = stats[key].get(name, 0) + n
            stats["link"]["queued_frames"] += theirs["link"]["queued_frames"]
        stats["queues"] = queues
        return stats

    def connections(self):
        flows = []
        for worker in self.workers:
            flows.extend((worker.snapshot or {}).get("connections", ()))
        return flows


class WorkerProcess(protocol.ProcessProtocol):
    """The main process's end of one worker."""

    def __init__(self, workers, index):
        self.workers = workers
        self.index = index
        self.pid = None
        self.ready = defer.Deferred()
        self.snapshot = None
        self._reader = MessageReader()
        self._ended = False
        self._kill_call = None

    def connectionMade(self):
        self.pid = self.transport.pid

    def childDataReceived(self, fd, data):
        try:
            messages = self._reader.feed(data)
        except ValueError as e:
            self.workers.log.error("queue worker {index}: {error}; stopping it",
                                   index=self.index, error=e)
            self._kill()
            return
        for kind, payload in messages:
            try:
                self._received(kind, payload)
            except Exception:
                self.workers.log.failure("queue worker {index}: bad {kind!r} message",
                                         index=self.index, kind=kind)

    def _received(self, kind, payload):
        if kind == RELAY:
            self.workers.relayed(payload)
        elif kind == SNAPSHOT:
            self.snapshot = json.loads(payload)
        elif kind == EVENT:
            event, details = json.loads(payload)
            self.workers.stack.emit(event, details)
        elif kind == CAPTURED:
            self.workers.captured(payload)
        elif kind == LOG:
            record = json.loads(payload)
            self.workers.log.emit(_level(record.get("level")), "queue worker {index}: {text}",
                                  index=self.index, text=record.get("text", ""))
        elif kind == READY:
            if not self.ready.called:
                self.ready.callback(self.index)
                self.send_options(self.workers._options)

    def send_options(self, options):
        if not self._ended and self.ready.called:
            self.transport.writeToChild(0, encode(OPTIONS, json.dumps(options).encode()))

    def stop(self):
        """Close its stdin (it exits at EOF); SIGKILL if it lingers."""
        if self._ended:
            return
        self.transport.closeStdin()
        self._kill_call = self.workers.reactor.callLater(STOP_GRACE, self._kill)

    def _kill(self):
        self._kill_call = None
        if not self._ended:
            try:
                self.transport.signalProcess("KILL")
            except Exception:
                pass

    def processEnded(self, reason):
        self._ended = True
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        text = reason.getErrorMessage()
        if self.ready.called:
            self.workers.ended(self, text)
        else:
            self.ready.errback(RuntimeError(f"queue worker {self.index} exited before "
                                            f"serving: {text}"))


def _level(name):
    from twisted.logger import LogLevel
    try:
        return LogLevel.levelWithName(name)
    except Exception:
        return LogLevel.info


# -- the worker's side


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
        # IPv4 carrying TCP, long enough for its ports and flags. A fragment is
        # dropped and counted by whichever dispatcher gets it.
        if len(frame) < 54 or frame[12] != 8 or frame[13] != 0 or frame[23] != 6:
            return False
        tcp_at = 14 + (frame[14] & 0x0F) * 4
        if len(frame) < tcp_at + 20:
            return False
        if frame[tcp_at + 13] & _PURE_SYN_MASK == SYN:
            return True
        key = (bytes(frame[26:30]), (frame[tcp_at] << 8) | frame[tcp_at + 1],
               bytes(frame[30:34]), (frame[tcp_at + 2] << 8) | frame[tcp_at + 3])
        return key in self.tcp_connections


def _worker_stack_class():
    from .stack import NetworkStack

    class QueueWorkerStack(NetworkStack):
        dispatcher_class = QueueDispatcher

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # ICMP never reaches a worker (relayed): no ping or raw socket here.
            self.icmp.forward = None

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
    """``python -m arcbox_net.multiqueue INDEX CONFIG_JSON LINK_KIND BUSY_POLL``,
    with the queue's fd as fd 3 and the channel on stdin/stdout."""
    index, config_json, link_kind, busy_poll = argv
    # Ctrl-C reaches the whole process group: the main process stops us (EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep stdout for the channel; a stray print goes to stderr instead.
    channel_fd = os.dup(1)
    os.dup2(2, 1)
    from .reactor import install
    reactor = install(float(busy_poll))
    from .allocator import tune
    from .config import StackConfig
    from .link.tap import TapLink
    from twisted.internet.stdio import StandardIO

    config = StackConfig(**json.loads(config_json))
    link = TapLink.from_fds([3], link_kind != "plain", link_kind == "vnet-offload",
                         f"tap queue {index}", config.mtu, reactor)
    stack = _worker_stack_class()(link, config, reactor=reactor)
    stack.dispatcher.tcp_connections = stack.tcp.connections
    # IP idents of this process start elsewhere than the main process's.
    stack.dispatcher._ident = (int(index) * 0x1000) & 0xFFFF
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
