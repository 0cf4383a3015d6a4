"""The shared machinery of frame-per-read links (datagram sockets, TAP).

Why not twisted's FileDescriptor: it treats writes as a byte stream (frames
would be joined) and has no notion of a frame budget per wakeup. This class
is a minimal IReadWriteDescriptor instead:

- doRead reads frames until EAGAIN or ``read_budget`` frames, so timers and
  host sockets still get their turn under load, and hands the whole batch to
  the sink in one call (handlers batch their ACKs per call).
- send_frame writes at once when the queue is empty; on EAGAIN the frame is
  queued and written when the fd becomes writable, and never dropped.
- ENOBUFS/ENOMEM (the kernel had no memory for the frame) is different: the
  fd keeps polling writable, so waiting for that would spin on a frame that
  blocks all the others. The queue is retried on a timer with backoff; a
  frame still refused after ``no_memory_give_up`` seconds is dropped and
  counted (``no-buffer-space``), as a full NIC ring would. EMSGSIZE (a frame
  this fd can never take) drops that frame at once (``message-too-long``).
  TCP resends what such a frame carried; the link itself stays up.
- An exception escaping doRead would make the reactor drop us silently, so
  errors are caught here and turned into a logged, orderly stop.
"""

import errno
import os
from collections import Counter, deque

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted.internet.interfaces import IReadWriteDescriptor

from ..interfaces import ILink, LinkCapabilities
from ..ratelimit import LimitedLog

_RETRY_LATER = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
_NO_MEMORY = (errno.ENOBUFS, errno.ENOMEM)


#: Link lines a peer can cause over and over (shared by the link modules), rate-limited.
limited_log = LimitedLog(Logger(namespace="arcbox_net.link"))


class LinkLost(Exception):
    """The link's fd closed or failed."""


class LinkState:
    """What every link keeps, whatever its fd: the state the shared functions
    below (report_lost, deliver, drop_oversize) and the stack's stats read."""

    log = Logger()
    #: Frames handed to the sink per wakeup at most.
    read_budget = 512

    def __init__(self, description, mtu=1500, reactor=None):
        self.description = description
        self.mtu = mtu
        if reactor is None:
            # Imported here: importing the link package must not install the
            # default reactor before a program could install its own.
            from twisted.internet import reactor
        self._reactor = reactor
        self._sink = None
        self._stopped = False
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.queued_high_water = 0
        #: Frames the link dropped, by reason (merged into the stack's stats).
        self.drops = Counter()

    @property
    def capabilities(self):
        """Bare frames of at most the MTU; links with a virtio-net header say more."""
        return LinkCapabilities.plain(self.mtu)


@implementer(ILink, IReadWriteDescriptor)
class FrameLink(LinkState):
    #: Largest frame read; 64 KiB frames plus headroom (a vnet header).
    read_size = 65550
    #: First wait after ENOBUFS/ENOMEM; it doubles on each refusal in a row.
    no_memory_retry = 0.001
    #: After this long refused in a row, a refused frame is dropped.
    no_memory_give_up = 0.25

    def __init__(self, fd, description, mtu=1500, reactor=None, owns_fd=True):
        super().__init__(description, mtu=mtu, reactor=reactor)
        self._fd = fd
        self._owns_fd = owns_fd
        self._queue = deque()
        self._writing = False
        #: When the current run of ENOBUFS/ENOMEM began (None: not in one).
        self._no_memory_since = None
        self._no_memory_call = None

    # -- ILink

    def start(self, sink):
        self._sink = sink
        os.set_blocking(self._fd, False)
        self._reactor.addReader(self)

    def send_frame(self, frame, vnet_header=None):
        if vnet_header is not None:
            raise ValueError(f"{self.description} carries no virtio-net header")
        if self._stopped:
            return
        if self._queue:
            self._enqueue(frame)
            return
        try:
            self._write(frame)
        except OSError as e:
            self._enqueue(frame, wait_writable=False)
            if self._write_failed(e):
                self.doWrite()
            return
        self._no_memory_since = None

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)
        self._queue.clear()
        call = self._no_memory_call
        if call is not None and call.active():
            call.cancel()
        self._no_memory_call = None
        if self._owns_fd:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1

    # -- what subclasses may override

    def _read(self):
        """Return one frame; raise BlockingIOError when none is ready."""
        data = os.read(self._fd, self.read_size)
        if not data:
            raise LinkLost("end of file")
        return data

    def _write(self, frame):
        if isinstance(frame, (bytes, bytearray, memoryview)):
            n = os.write(self._fd, frame)
            length = len(frame)
        else:
            n = os.writev(self._fd, frame)
            length = sum(len(b) for b in frame)
        if n != length:
            # A frame link takes whole frames or nothing; a short write means
            # the fd is not what we think it is.
            raise LinkLost(f"short write of a frame ({n} of {length} bytes)")
        self.frames_out += 1
        self.bytes_out += n

    # -- IReadWriteDescriptor

    def fileno(self):
        return self._fd

    def logPrefix(self):
        return "arcbox-link"

    def doRead(self):
        frames = []
        try:
            for _ in range(self.read_budget):
                try:
                    frame = self._read()
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                if frame is not None:
                    frames.append(frame)
        except (OSError, LinkLost) as e:
            self._deliver(frames)
            self._lost(e)
            return None
        self._deliver(frames)
        return None

    def _deliver(self, frames):
        deliver(self, frames)

    def doWrite(self):
        queue = self._queue
        while queue:
            try:
                self._write(queue[0])
            except OSError as e:
                if self._write_failed(e):
                    continue  # the refused frame was dropped: try the next
                return None
            except LinkLost as e:
                self._lost(e)
                return None
            queue.popleft()
            self._no_memory_since = None
        self._stop_writing()
        return None

    def _write_failed(self, error):
        """The frame at the head of the queue was refused with ``error``.

        Arranges the retry (writable fd, or a timer) and returns False; returns
        True when the frame was dropped instead and the next may be tried.
        """
        code = error.errno
        if code in _RETRY_LATER:
            if not self._writing:
                self._writing = True
                self._reactor.addWriter(self)
            return False
        if code == errno.EMSGSIZE:
            self._queue.popleft()
            self._drop("message-too-long", error)
            return True
        if code in _NO_MEMORY:
            return self._wait_for_memory()
        self._lost(error)
        return False

    def _stop_writing(self):
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)

    def _wait_for_memory(self):
        """The head frame was refused for want of kernel memory: retry later.

        Returns True when it has been refused for ``no_memory_give_up``
        seconds and was dropped instead (the caller goes on with the next).
        """
        self._stop_writing()
        now = self._reactor.seconds()
        since = self._no_memory_since
        if since is None:
            since = self._no_memory_since = now
        elif now - since >= self.no_memory_give_up:
            self._queue.popleft()
            self._drop("no-buffer-space", None)
            return True
        if self._no_memory_call is None:
            delay = max(self.no_memory_retry, now - since)
            self._no_memory_call = self._reactor.callLater(delay, self._retry_after_no_memory)
        return False

    def _retry_after_no_memory(self):
        self._no_memory_call = None
        if not self._stopped:
            self.doWrite()

    def _drop(self, reason, error):
        """Count a frame the kernel refused; the first time, say why."""
        if not self.drops[reason]:
            self.log.warn("guest link {link}: the kernel refused a frame ({error}); "
                          "dropping such frames, counted as {reason}",
                          link=self.description, reason=reason,
                          error=describe_error(error) if error is not None
                          else f"no buffer space for {self.no_memory_give_up} s")
        self.drops[reason] += 1

    def connectionLost(self, reason):
        self._lost(reason.value if isinstance(reason, Failure) else reason)

    def _enqueue(self, frame, wait_writable=True):
        if not isinstance(frame, (bytes, bytearray)):
            frame = bytes(frame) if isinstance(frame, memoryview) else [bytes(b) for b in frame]
        self._queue.append(frame)
        if len(self._queue) > self.queued_high_water:
            self.queued_high_water = len(self._queue)
        if wait_writable and not self._writing and self._no_memory_call is None:
            self._writing = True
            self._reactor.addWriter(self)

    @property
    def queued_frames(self):
        return len(self._queue)

    def _lost(self, error):
        report_lost(self, error)


# What every link does the same way, whatever its fd: these take any link with
# ``description``, ``log``, ``_sink``, ``_stopped``, ``stop()``, the counters
# ``frames_in``/``bytes_in`` and, for oversize frames, ``drops``/``max_frame``.


def describe_error(error):
    """One line for a log: strerror and errno name for OS errors, else the message."""
    if isinstance(error, OSError) and error.errno:
        return f"{os.strerror(error.errno)} (errno {errno.errorcode.get(error.errno, error.errno)})"
    return str(error) or type(error).__name__


def report_lost(link, error):
    """The link's fd is gone: log once, stop the link, tell its sink."""
    if link._stopped:
        return
    link.log.error("guest link {link} lost: {error}", link=link.description,
                   error=describe_error(error))
    sink = link._sink
    link.stop()
    if sink is not None:
        sink.link_lost(error)


def deliver(link, frames):
    """Count a batch of frames and hand it to the link's sink."""
    if not frames or link._sink is None:
        return
    link.frames_in += len(frames)
    link.bytes_in += sum(len(f) for f in frames)
    try:
        link._sink.frames_received(frames)
    except Exception:
        # The dispatcher already guards each frame; this is a last resort
        # so that one bug cannot take the whole link down.
        limited_log.failure("frame sink raised")


def drop_oversize(link, count=1):
    """Count frames longer than the MTU allows; say so in the log the first time."""
    if not link.drops["oversize-frame"]:
        link.log.warn("guest link {link}: dropping frames longer than {limit} bytes "
                      "(MTU {mtu}); counted as oversize-frame",
                      link=link.description, limit=link.max_frame, mtu=link.mtu)
    link.drops["oversize-frame"] += count


#: accept() errors that leave the listening socket usable: out of fds or
#: memory, or a client that went away while queued.
_ACCEPT_TRANSIENT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                     errno.ECONNABORTED, errno.EPROTO)


class OnePeerListener:
    """The listening socket of a link that serves one peer at a time (the
    IReadDescriptor part of ``--listen-stream`` and ``--vhost-user``).

    Every waiting connection is accepted: the first while no peer is served
    goes to ``_accepted(sock)``, the others are closed at once and counted
    (``peers_refused``). A transient accept() failure (no fd left) is logged,
    rate-limited, and tried again at the next wakeup; any other failure loses
    the link. Needs ``_listener``, ``_stopped``, ``description``,
    ``peers_served``/``peers_refused``, ``_serving()`` and ``_accepted(sock)``.
    """

    #: What a refused second connection is called in the log line.
    refused_text = "another peer"

    def fileno(self):
        return -1 if self._stopped else self._listener.fileno()

    def doRead(self):
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in _ACCEPT_TRANSIENT:
                    limited_log.warn("guest link {link}: accept failed: {error}",
                                     link=self.description, error=describe_error(e))
                    return None
                self._listener_lost(e)
                return None
            if self._serving():
                self.peers_refused += 1
                limited_log.warn("guest link {link}: refusing {what} while one is connected",
                                 link=self.description, what=self.refused_text)
                sock.close()
                continue
            self.peers_served += 1
            self._accepted(sock)
        return None

    def connectionLost(self, reason):
        self._listener_lost(reason.value if isinstance(reason, Failure) else reason)

    def _listener_lost(self, error):
        report_lost(self, error)

