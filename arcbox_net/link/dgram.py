"""``--listen-dgram PATH``: a bound unix datagram socket, one frame per datagram.

The peer (QEMU ``-netdev dgram`` with unix local/remote paths, vfkit's
``virtio-net,unixSocketPath=``) binds its own socket and sends to PATH; the
link learns the peer's address from the datagrams it receives (recvfrom)
and sends back to it (sendto). The latest sender is the peer: a VM that
restarts with a new socket path is followed. vfkit announces itself with a
4-byte ``VFKT`` datagram, which is taken as a hello, not a frame.

A peer that is gone (its socket closed or removed: ECONNREFUSED/ENOENT on
send) is logged and forgotten, and frames for it are dropped and counted
(``no-peer``); that does not lose the link. Only a failure of our own socket
does.

Guest -> host, the peer's sends: an AF_UNIX datagram sent to an unconnected
socket counts against ``net.unix.max_dgram_qlen`` (10 by default): the 11th
queued datagram is refused with EAGAIN while the sender's socket still polls
writable. QEMU's ``-netdev dgram`` sends from an unconnected socket, so once
our queue held 10 frames it spun on sendto, taking the CPU we needed to drain
the queue (beside a running VM: 0.03 Gbit/s and over 100 CPU-s/GB in QEMU).
So the link connects its socket to the peer it learns. A datagram from the
socket a receiver is connected to skips the qlen test: the sender's own
buffer (SO_SNDBUF, about 90 frames of 1500 bytes) bounds the queue instead,
and then the sender polls not-writable until we have read, as on a
socketpair: QEMU waits in poll instead of spinning. A connected socket takes
datagrams from its peer only, so after ``peer_idle`` seconds without one the
link dissolves the association (a restarted VM, a new socket path, is heard
again within that time) and re-learns the next sender.

Host -> guest, our sends: QEMU's socket is unconnected, so our datagrams to it
face its qlen of 10, and an unconnected socket polls writable even while the
peer's receive queue is full, so waiting on our own socket would spin. A second socket *connected* to the peer does poll as the
peer's queue: Linux reports it writable only when the peer has room, and
wakes it when the peer reads. That socket (``_PeerRoom``) never sends; the
reactor watches it while frames are queued. Only if it cannot be made (no fd
left) is a queued frame retried after ``retry_delay`` instead: a peer we can
send to also accepts the connect. Before the watcher, a retry every
millisecond capped host->guest at ~0.1 Gbit/s at MTU 1500 behind QEMU's
-netdev dgram.
"""

import errno
import socket

from zope.interface import implementer
from twisted.internet.interfaces import IWriteDescriptor

from .base import FrameLink, drop_oversize, limited_log
from .stream import MAX_FRAME
from .unixsock import bind_unix, disconnect, max_frame_len, unlink_if_ours

VFKIT_HELLO = b"VFKT"
_PEER_GONE = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.ECONNRESET,
              errno.EPERM, errno.EACCES, errno.EDESTADDRREQ)


@implementer(IWriteDescriptor)
class _PeerRoom:
    """A socket connected to the peer, polled for room in the peer's queue."""

    def __init__(self, peer, on_room):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        try:
            self._sock.connect(peer)
        except OSError:
            self._sock.close()
            raise
        self._on_room = on_room

    def fileno(self):
        return self._sock.fileno()

    def doWrite(self):
        self._on_room()
        return None

    def connectionLost(self, reason):
        # epoll reported an error or hang-up (the peer's socket is gone) and
        # the reactor dropped us: let the link try, meet the error and move on.
        self._on_room()

    def logPrefix(self):
        return "arcbox-link"

    def close(self):
        self._sock.close()


class DgramListenLink(FrameLink):
    #: Room for the largest datagram any peer sends, plus one byte to see
    #: that a datagram was longer than that.
    read_size = MAX_FRAME + 1
    retry_delay = 0.001
    #: Seconds without a datagram from the peer before the socket takes any sender again.
    peer_idle = 1.0

    def __init__(self, sock, path, inode=None, mtu=1500, reactor=None):
        super().__init__(sock.fileno(), f"unix dgram socket {path} (listening)", mtu=mtu,
                         reactor=reactor, owns_fd=False)
        self._sock = sock
        self.path = path
        self._inode = inode
        self.max_frame = max_frame_len(mtu)
        #: The address replies go to (a path), once learned.
        self.peer = None
        self._warned_unbound = False
        self._retry = None
        #: The _PeerRoom for ``peer`` (None until a send finds the peer full,
        #: False when it could not be made).
        self._room = None
        self._watching_room = False
        #: Our socket is connected to ``peer`` (see the module docstring).
        self._associated = False
        self._heard = False
        self._idle_call = None
        #: A peer whose connect failed: not tried again for each frame.
        self._unassociable = None

    @classmethod
    def listen(cls, path, mtu=1500, reactor=None):
        sock, inode = bind_unix(path, socket.SOCK_DGRAM)
        return cls(sock, path, inode, mtu=mtu, reactor=reactor)

    @property
    def connected(self):
        return self.peer is not None

    def _read(self):
        data, addr = self._sock.recvfrom(self.read_size)
        if addr != self.peer:
            self._learn(addr)
        elif not self._associated and addr and addr != self._unassociable:
            self._associate()
        self._heard = True
        if len(data) > self.max_frame:
            drop_oversize(self)
            return None
        if not data or data == VFKIT_HELLO:
            return None
        return data

    def _learn(self, addr):
        if not addr:
            # An unbound (unnamed) sender: it can send to us, we cannot answer.
            if not self._warned_unbound:
                self._warned_unbound = True
                self.log.warn("guest link {link}: datagrams from an unbound socket; replies "
                              "cannot reach it (the peer must bind its socket to a path)",
                              link=self.description)
            return
        if self.peer is None:
            self.log.info("guest link {link}: peer is {peer}", link=self.description, peer=addr)
        else:
            limited_log.info("guest link {link}: peer changed from {old} to {peer}",
                              link=self.description, old=self.peer, peer=addr)
            self._drop_queue()
        self._forget_room()
        self.peer = addr
        self._associate()

    def _associate(self):
        """Connect to the peer so its sends skip the qlen limit (module docstring)."""
        if self._associated:
            self._dissociate()
        try:
            self._sock.connect(self.peer)
        except OSError as e:
            self._unassociable = self.peer
            self.log.info("guest link {link}: cannot associate with {peer} ({error}); its "
                          "sends face net.unix.max_dgram_qlen", link=self.description,
                          peer=self.peer, error=e.strerror)
            return
        self._associated = True
        self._heard = True
        self._idle_call = self._reactor.callLater(self.peer_idle, self._check_idle)

    def _dissociate(self):
        call, self._idle_call = self._idle_call, None
        if call is not None and call.active():
            call.cancel()
        if self._associated:
            self._associated = False
            try:
                disconnect(self._sock)
            except OSError:
                pass

    def _check_idle(self):
        self._idle_call = None
        if self._stopped or not self._associated:
            return
        if self._heard:
            self._heard = False
            self._idle_call = self._reactor.callLater(self.peer_idle, self._check_idle)
            return
        # Quiet for a whole period: listen to every sender again (replies
        # still go to the peer); its next datagram, or a new peer's, associates anew.
        self._dissociate()

    def _drop_queue(self):
        if self._queue:
            self.drops["no-peer"] += len(self._queue)
            self._queue.clear()

    def _write(self, frame):
        peer = self.peer
        if peer is None:
            self.drops["no-peer"] += 1
            return
        try:
            if isinstance(frame, (bytes, bytearray, memoryview)):
                n = self._sock.sendto(frame, peer)
            else:
                n = self._sock.sendmsg(frame, [], 0, peer)
        except OSError as e:
            if e.errno not in _PEER_GONE:
                raise
            self.log.info("guest link {link}: peer {peer} is gone ({error}); waiting for "
                          "the next one", link=self.description, peer=peer,
                          error=e.strerror)
            self._dissociate()
            self.peer = None
            self._forget_room()
            self.drops["no-peer"] += 1
            return
        self.frames_out += 1
        self.bytes_out += n

    def doWrite(self):
        super().doWrite()
        if not self._queue or self._stopped or self._no_memory_call is not None:
            return None
        # Still full, yet our own socket polls writable: wait on the peer's room.
        self._reactor.removeWriter(self)
        room = self._peer_room()
        if room:
            if not self._watching_room:
                self._watching_room = True
                self._reactor.addWriter(room)
        elif self._retry is None:
            self._retry = self._reactor.callLater(self.retry_delay, self._resume)
        return None

    def _peer_room(self):
        if self._room is None and self.peer is not None:
            try:
                self._room = _PeerRoom(self.peer, self._peer_has_room)
            except OSError:
                self._room = False
        return self._room

    def _peer_has_room(self):
        if self._watching_room:
            self._watching_room = False
            self._reactor.removeWriter(self._room)
        if not self._stopped:
            self.doWrite()

    def _forget_room(self):
        room = self._room
        if room:
            if self._watching_room:
                self._reactor.removeWriter(room)
            room.close()
        self._room = None
        self._watching_room = False
        if self._queue and not self._stopped:
            # Frames queued for the old peer are gone; nothing to wait for.
            self._writing = True
            self._reactor.addWriter(self)

    def _resume(self):
        self._retry = None
        if self._stopped:
            return
        if self._queue:
            self._reactor.addWriter(self)
        else:
            self._writing = False

    def stop(self):
        if self._stopped:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._dissociate()
        super().stop()
        self._forget_room()
        self._sock.close()
        unlink_if_ours(self.path, self._inode)
