"""The main process's side of ``--queues N``: one worker process per extra queue.

The stack hands ``QueueWorkers`` what it needs as callbacks (where relayed
frames, events and captured frames go, what to do when a worker exits) and
tells it what changes through ``set_options``; it never reaches into the
stack's attributes.
"""

import json
import os
import sys

from twisted.internet import defer, protocol
from twisted.logger import Logger

from .messages import (CAPTURED, EVENT, LOG, OPTIONS, READY, RELAY, SNAPSHOT, STOP_GRACE,
                       MessageReader, encode)


class QueueWorkers:
    """Starts a worker process per extra queue fd and merges what they report.

    ``relay(frame)`` takes a frame a worker does not serve (the main
    dispatcher's input), ``emit(kind, details)`` a worker's event,
    ``capture()`` returns the running capture or None, and ``lost(reason)``
    is called when a worker exits while serving (the stack stops then).
    ``events``/``capture`` in ``options`` say what workers must report from
    the start (a subscriber or a capture may exist before the workers do).
    """

    log = Logger()

    def __init__(self, config, fds, reactor, relay, emit, capture, lost,
                 link_kind="vnet-offload", busy_poll=0.0, options=None):
        self.config = config
        self.reactor = reactor
        self.relay = relay
        self.emit = emit
        self._capture = capture
        self._lost = lost
        self._fds = list(fds)
        #: "vnet-offload6" (TCPv4 and v6 GSO), "vnet-offload", "vnet" (header,
        #: no offloads) or "plain": as queue 0.
        self._link_kind = link_kind
        self._busy_poll = busy_poll
        self.workers = []
        self._stopping = False
        self.options = {"events": False, "capture": False, **(options or {})}

    def start(self):
        """Spawn the workers; a Deferred that fires once all are serving, or
        fails if one exits first."""
        config = json.dumps(self.config.to_json() | {"forwards": []})
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        ready = []
        for index, fd in enumerate(self._fds, start=1):
            worker = WorkerProcess(self, index)
            args = [sys.executable, "-m", "arcbox_net.multiqueue.worker", str(index), config,
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
        """Tell every worker what to report from now on (events, capture)."""
        self.options.update(options)
        for worker in self.workers:
            worker.send_options(self.options)

    # -- what workers say

    def captured(self, frame):
        capture = self._capture()
        if capture is not None:
            capture.write(frame)

    def ended(self, worker, reason):
        if self._stopping:
            return
        self.log.error("queue worker {index} (pid {pid}) exited: {reason}; stopping",
                       index=worker.index, pid=worker.pid, reason=reason)
        self._lost(f"queue worker {worker.index} exited: {reason}")

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
            self.workers.relay(payload)
        elif kind == SNAPSHOT:
            self.snapshot = json.loads(payload)
        elif kind == EVENT:
            event, details = json.loads(payload)
            self.workers.emit(event, details)
        elif kind == CAPTURED:
            self.workers.captured(payload)
        elif kind == LOG:
            record = json.loads(payload)
            self.workers.log.emit(_level(record.get("level")), "queue worker {index}: {text}",
                                  index=self.index, text=record.get("text", ""))
        elif kind == READY:
            if not self.ready.called:
                self.ready.callback(self.index)
                self.send_options(self.workers.options)

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
