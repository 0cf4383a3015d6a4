"""``--fd N``: an inherited, connected socket carrying one frame per datagram.

This is how a VMM hands over the guest NIC (socketpair SOCK_DGRAM or
SOCK_SEQPACKET). A SOCK_DGRAM peer that goes away is only noticed when a
write fails (ECONNREFUSED), which ends the link like an EOF would.

``--vnet-hdr`` (``VnetSocketFrameLink``): each datagram starts with a
``virtio_net_hdr_v1`` (12 bytes), as a VMM that speaks virtio-net passes its
guest's frames, so TSO frames up to 64 KiB and partial checksums cross the
socket both ways, as on an offload TAP.
"""

import socket as _socket

from ..wire import vnet
from .base import FrameLink, LinkLost, drop_oversize
from .unixsock import max_frame_len
from .vnethdr import VnetFraming

#: Room for 64 KiB frames on both ends: an AF_UNIX datagram counts against
#: the receiver's buffer, so a small one makes big frames fail with ENOBUFS.
SOCKET_BUFFER = 4 * 1024 * 1024


class SocketFrameLink(FrameLink):
    def __init__(self, sock, mtu=1500, reactor=None):
        kind = sock.type
        if kind not in (_socket.SOCK_DGRAM, _socket.SOCK_SEQPACKET):
            raise ValueError(f"fd {sock.fileno()} is a {kind!r} socket; a frame link "
                             "needs SOCK_DGRAM or SOCK_SEQPACKET")
        self._sock = sock
        self._seqpacket = kind == _socket.SOCK_SEQPACKET
        for opt in (_socket.SO_SNDBUF, _socket.SO_RCVBUF):
            try:
                sock.setsockopt(_socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
        name = "seqpacket" if self._seqpacket else "dgram"
        super().__init__(sock.fileno(), f"fd {sock.fileno()} ({name} socket)",
                         mtu=mtu, reactor=reactor, owns_fd=False)
        self.max_frame = max_frame_len(mtu)

    @staticmethod
    def socket_from_fd(fd):
        """A socket object for inherited ``fd`` (its type read with SO_TYPE)."""
        try:
            return _socket.socket(fileno=fd)
        except OSError as e:
            raise ValueError(f"fd {fd} is not a usable socket: {e.strerror}") from None

    @classmethod
    def from_fd(cls, fd, mtu=1500, reactor=None):
        return cls(cls.socket_from_fd(fd), mtu=mtu, reactor=reactor)

    def _read(self):
        data = self._sock.recv(self.read_size)
        if not data:
            if self._seqpacket:
                raise LinkLost("peer closed the socket")
            return None  # an empty datagram: nothing to dispatch
        if len(data) > self.max_frame:
            drop_oversize(self)
            return None
        return data

    def _write(self, frame):
        if isinstance(frame, (bytes, bytearray, memoryview)):
            n = self._sock.send(frame)
        else:
            n = self._sock.sendmsg(frame)
        self.frames_out += 1
        self.bytes_out += n

    def stop(self):
        super().stop()
        self._sock.close()


class VnetSocketFrameLink(VnetFraming, SocketFrameLink):
    """``--fd N --vnet-hdr``: datagrams of a virtio_net_hdr_v1 and a frame."""

    vnet_header_len = vnet.HEADER_V1_LEN

    def __init__(self, sock, mtu=1500, reactor=None):
        super().__init__(sock, mtu=mtu, reactor=reactor)
        self.description += " with virtio-net headers"

    def _read(self):
        data = self._sock.recv(self.read_size)
        if not data:
            if self._seqpacket:
                raise LinkLost("peer closed the socket")
            return None
        return self._strip_vnet(data)

    def _send_framed(self, buffers):
        SocketFrameLink.send_frame(self, buffers)
