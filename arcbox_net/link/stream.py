"""Frames on a unix stream socket: a 4-byte big-endian length before each frame.

This is the framing of QEMU >= 7.2 ``-netdev stream``, passt and gvproxy's
qemu protocol. Three links use it:

- ``StreamLink``: one connected socket, from ``--fd N`` (a SOCK_STREAM
  socket) or ``--connect-stream PATH``. When the peer goes, the link is lost
  (``IFrameSink.link_lost``), like any other single-peer link.
- ``StreamListenLink``: ``--listen-stream PATH``. One peer (guest) at a time;
  a peer that disconnects, or breaks the framing, is logged and closed, and
  the link waits for the next one. That is not a lost link: ``link_lost`` is
  only reported when the listening socket itself fails.

The parts are layered so the framing can be tested without sockets:

- ``StreamDecoder`` (sans-I/O): feed it bytes as they arrive, get whole
  frames back; a bad length prefix (zero, shorter than an Ethernet header,
  longer than ``MAX_FRAME``) sets ``decoder.error``. It never buffers more
  than one frame plus its prefix.
- ``WriteQueue`` (sans-I/O): frames waiting to be written, with partial
  writes resumed where they stopped; nothing accepted is ever dropped.
- ``StreamPeer``: the reactor descriptor for one connected socket.
"""

import errno
import itertools
import socket
import struct
from collections import deque

from twisted.internet.interfaces import IReadDescriptor, IReadWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import ILink
from .base import (LinkState, OnePeerListener, deliver, describe_error, drop_oversize, report_lost)
from .unixsock import bind_unix, max_frame_len, size_buffers, unlink_if_ours

HEADER = struct.Struct(">I")
#: A frame shorter than an Ethernet header means the stream is out of step.
MIN_FRAME = 14
#: The largest length prefix accepted: QEMU's largest packet (NET_BUFSIZE,
#: 64 KiB + 4 KiB). Frames above the link's MTU but below this keep the
#: stream in step; they are dropped and counted by the link.
MAX_FRAME = 65536 + 4096
#: Buffers gathered into one sendmsg call.
IOV_BATCH = 64


class FramingError(Exception):
    """The byte stream does not hold length-prefixed Ethernet frames."""

    def __str__(self):
        return f"framing error: {super().__str__()}"


class PeerGone(Exception):
    """The peer closed its end of the connection."""


class StreamDecoder:
    """Length-prefixed frames out of a byte stream, fed in arbitrary pieces."""

    def __init__(self, max_frame=MAX_FRAME, min_frame=MIN_FRAME):
        self.max_frame = max_frame
        self.min_frame = min_frame
        self._buf = bytearray()
        #: A FramingError once the stream is known to be bad; feeding stops.
        self.error = None

    @property
    def buffered(self):
        """Bytes held back, waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data):
        """Return the frames completed by ``data`` (a list of bytes).

        Frames before a bad prefix are still returned; then ``error`` is set
        and every further ``feed`` raises it.
        """
        if self.error is not None:
            raise self.error
        buffered = bool(self._buf)
        if buffered:
            self._buf += data
            view = memoryview(self._buf)
        else:
            view = memoryview(data)
        frames = []
        pos = 0
        end = len(view)
        min_frame, max_frame = self.min_frame, self.max_frame
        try:
            while end - pos >= 4:
                length = HEADER.unpack_from(view, pos)[0]
                if length < min_frame or length > max_frame:
                    self.error = FramingError(_bad_length(length, min_frame, max_frame))
                    break
                stop = pos + 4 + length
                if stop > end:
                    break
                frames.append(bytes(view[pos + 4:stop]))
                pos = stop
            if self.error is not None or pos == end:
                self._buf = bytearray()
            elif not buffered:
                self._buf = bytearray(view[pos:])
        finally:
            view.release()
        if buffered and pos and self._buf:
            del self._buf[:pos]
        return frames


def _bad_length(length, min_frame, max_frame):
    if length == 0:
        return "zero-length frame on the stream"
    if length < min_frame:
        return (f"length prefix {length} is shorter than an Ethernet header "
                "(garbage on the stream?)")
    return (f"length prefix {length} exceeds the {max_frame}-byte limit "
            "(garbage on the stream?)")


def encode(frame):
    """One frame (bytes, or a sequence of buffers) as it goes on the stream."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return HEADER.pack(len(frame)) + bytes(frame)
    body = b"".join(frame)
    return HEADER.pack(len(body)) + body


class WriteQueue:
    """Length-prefixed frames waiting for the socket; partial writes resume.

    ``flush(send)`` calls ``send(buffers)`` (a sendmsg-like callable that
    returns the number of bytes taken, or raises BlockingIOError) until the
    queue is empty or the socket is full.
    """

    def __init__(self):
        self._bufs = deque()
        self._ends = deque()  # parallel to _bufs: True where a frame ends
        #: Frames not yet completely written.
        self.frames = 0
        #: Bytes not yet written (prefixes included).
        self.bytes = 0

    def __len__(self):
        return self.frames

    def push(self, frame):
        """Queue one frame (bytes, or a sequence of buffers); return its length."""
        if isinstance(frame, (bytes, bytearray, memoryview)):
            parts = [frame]
        else:
            parts = list(frame)
        # A caller may reuse a mutable buffer once we return: keep a copy.
        parts = [p if isinstance(p, bytes) else bytes(p) for p in parts]
        parts = [p for p in parts if p]
        length = sum(len(p) for p in parts)
        if not length:
            return 0  # an empty frame would break the peer's framing
        self._bufs.append(HEADER.pack(length))
        self._ends.append(False)
        for p in parts:
            self._bufs.append(p)
            self._ends.append(False)
        self._ends[-1] = True
        self.frames += 1
        self.bytes += 4 + length
        return length

    def flush(self, send):
        """Write as much as ``send`` takes; True when nothing is left."""
        bufs = self._bufs
        while bufs:
            batch = list(itertools.islice(bufs, IOV_BATCH))
            try:
                n = send(batch)
            except (BlockingIOError, InterruptedError):
                return False
            self._advance(n)
            if n < sum(len(b) for b in batch):
                return False  # a short write: the socket is full for now
        return True

    def _advance(self, n):
        bufs, ends = self._bufs, self._ends
        self.bytes -= n
        while n:
            head = bufs[0]
            if n >= len(head):
                n -= len(head)
                bufs.popleft()
                if ends.popleft():
                    self.frames -= 1
            else:
                bufs[0] = memoryview(head)[n:]
                n = 0

    def clear(self):
        self._bufs.clear()
        self._ends.clear()
        self.frames = 0
        self.bytes = 0


@implementer(IReadWriteDescriptor)
class StreamPeer:
    """One connected stream socket in the reactor; reports to its link.

    The link (``owner``) provides ``read_budget``, ``_peer_frames(peer,
    frames)`` and ``_peer_gone(peer, error)``.
    """

    read_size = 256 * 1024

    def __init__(self, sock, owner, reactor, max_frame=MAX_FRAME):
        self.sock = sock
        self.owner = owner
        self._reactor = reactor
        self.decoder = StreamDecoder(max_frame=max_frame)
        self.queue = WriteQueue()
        self._writing = False
        self._flush_call = None
        self._no_memory_delay = 0.0
        self.closed = False

    def start(self):
        self.sock.setblocking(False)
        size_buffers(self.sock)
        self._reactor.addReader(self)

    def send(self, frame):
        """Queue a frame for the end of this reactor turn; return its length.

        A host read of 512 KiB becomes ~360 frames at MTU 1500: gathered, they
        leave in a few sendmsg calls of IOV_BATCH buffers instead of one each.
        """
        if self.closed:
            return 0
        length = self.queue.push(frame)
        if not self._writing and self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._turn_flush)
        return length

    def _turn_flush(self):
        self._flush_call = None
        if not self.closed and not self._writing:
            self._flush()

    def _wait_for_memory(self):
        """The kernel had no memory for our data: try again on a timer.

        The socket keeps polling writable, so waiting for that would spin.
        Nothing is dropped: the stream keeps its queue (1 ms, doubling to 0.1 s).
        """
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        self._no_memory_delay = min(max(self._no_memory_delay * 2, 0.001), 0.1)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(self._no_memory_delay, self._turn_flush)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)
        self._writing = False
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        self.sock.close()

    def _flush(self):
        try:
            done = self.queue.flush(self.sock.sendmsg)
        except OSError as e:
            if e.errno in (errno.ENOBUFS, errno.ENOMEM):
                self._wait_for_memory()
                return
            self.owner._peer_gone(self, e)
            return
        self._no_memory_delay = 0.0
        if done:
            if self._writing:
                self._writing = False
                self._reactor.removeWriter(self)
        elif not self._writing:
            self._writing = True
            self._reactor.addWriter(self)

    # -- IReadWriteDescriptor

    def fileno(self):
        return -1 if self.closed else self.sock.fileno()

    def logPrefix(self):
        return "arcbox-link"

    def doRead(self):
        frames = []
        error = None
        budget = self.owner.read_budget
        decoder = self.decoder
        while len(frames) < budget:
            try:
                data = self.sock.recv(self.read_size)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                error = e
                break
            if not data:
                error = PeerGone("the peer closed the connection")
                break
            frames += decoder.feed(data)
            if decoder.error is not None:
                error = decoder.error
                break
        if frames:
            self.owner._peer_frames(self, frames)
        if error is not None and not self.closed:
            self.owner._peer_gone(self, error)
        return None

    def doWrite(self):
        if not self.closed:
            self._flush()
        return None

    def connectionLost(self, reason):
        if not self.closed:
            self.owner._peer_gone(self, reason.value if isinstance(reason, Failure) else reason)


@implementer(ILink)
class _StreamLinkBase(LinkState):
    """What the connected and the listening stream links share."""

    def __init__(self, description, mtu=1500, reactor=None):
        super().__init__(description, mtu=mtu, reactor=reactor)
        self.max_frame = max_frame_len(mtu)
        self._peer = None

    @property
    def queued_frames(self):
        peer = self._peer
        return peer.queue.frames if peer is not None else 0

    @property
    def connected(self):
        """True while a peer is attached."""
        return self._peer is not None

    def send_frame(self, frame, vnet_header=None):
        if vnet_header is not None:
            raise ValueError(f"{self.description} carries no virtio-net header")
        if self._stopped:
            return
        peer = self._peer
        if peer is None:
            self.drops["no-peer"] += 1
            return
        n = peer.send(frame)
        self.frames_out += 1
        self.bytes_out += n
        if peer.queue.frames > self.queued_high_water:
            self.queued_high_water = peer.queue.frames

    def _new_peer(self, sock):
        peer = StreamPeer(sock, self, self._reactor)
        self._peer = peer
        peer.start()
        return peer

    def _peer_frames(self, peer, frames):
        if peer is not self._peer or self._sink is None:
            return
        limit = self.max_frame
        good = [f for f in frames if len(f) <= limit]
        if len(good) != len(frames):
            drop_oversize(self, len(frames) - len(good))
        deliver(self, good)


class StreamLink(_StreamLinkBase):
    """A single connected stream socket: ``--fd N`` (SOCK_STREAM), ``--connect-stream``.

    The peer going away (EOF, an error, bad framing) loses the link.
    """

    def __init__(self, sock, description, mtu=1500, reactor=None):
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"fd {sock.fileno()} is not a SOCK_STREAM socket")
        super().__init__(description, mtu=mtu, reactor=reactor)
        self._sock = sock

    @classmethod
    def from_socket(cls, sock, mtu=1500, reactor=None):
        return cls(sock, f"fd {sock.fileno()} (stream socket)", mtu=mtu, reactor=reactor)

    @classmethod
    def connect(cls, path, mtu=1500, reactor=None):
        """Connect to a listening unix stream socket (QEMU ``server=on``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(10)
            sock.connect(path)
        except OSError as e:
            sock.close()
            why = e.strerror or str(e) or type(e).__name__
            raise ValueError(f"cannot connect to stream socket {path}: {why}") from None
        return cls(sock, f"unix stream socket {path} (connected)", mtu=mtu, reactor=reactor)

    def start(self, sink):
        self._sink = sink
        self._new_peer(self._sock)

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        if self._peer is not None:
            self._peer.close()
        else:
            self._sock.close()

    def _peer_gone(self, peer, error):
        if peer is self._peer:
            report_lost(self, error)


@implementer(IReadDescriptor)
class StreamListenLink(OnePeerListener, _StreamLinkBase):
    """``--listen-stream PATH``: serve one peer at a time on a listening socket.

    A peer leaving is logged, not reported as a lost link: the next peer
    that connects is served (the guest's MAC is learned again from its
    frames). Frames sent while no peer is attached are dropped and counted
    as ``no-peer`` (the guest they were for is gone; TCP retransmits to a
    guest that comes back). A second peer connecting while one is served is
    refused (closed at once, logged).
    """

    def __init__(self, listener, path, inode=None, mtu=1500, reactor=None):
        super().__init__(f"unix stream socket {path} (listening)", mtu=mtu, reactor=reactor)
        self._listener = listener
        self.path = path
        self._inode = inode
        self.peers_served = 0
        self.peers_refused = 0

    refused_text = "another peer (one guest at a time)"

    @classmethod
    def listen(cls, path, mtu=1500, reactor=None):
        sock, inode = bind_unix(path, socket.SOCK_STREAM)
        sock.listen(8)
        return cls(sock, path, inode, mtu=mtu, reactor=reactor)

    def start(self, sink):
        self._sink = sink
        self._reactor.addReader(self)

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        self._reactor.removeReader(self)
        if self._peer is not None:
            self._peer.close()
            self._peer = None
        self._listener.close()
        unlink_if_ours(self.path, self._inode)

    # -- the listening socket (IReadDescriptor)

    def logPrefix(self):
        return "arcbox-link"

    def _serving(self):
        return self._peer is not None

    def _accepted(self, sock):
        self._new_peer(sock)
        self.log.info("guest link {link}: peer connected", link=self.description)

    # -- the peer

    def _peer_gone(self, peer, error):
        if peer is not self._peer:
            return
        self._peer = None
        unsent = peer.queue.frames
        peer.close()
        if unsent:
            self.drops["no-peer"] += unsent
        if isinstance(error, PeerGone):
            self.log.info("guest link {link}: peer disconnected; waiting for the next one",
                          link=self.description)
        else:
            self.log.error("guest link {link}: closing the peer: {error}; waiting for the "
                           "next one", link=self.description, error=describe_error(error))

