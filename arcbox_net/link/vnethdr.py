"""Frame links whose every frame starts with a virtio-net header.

A TAP opened with IFF_VNET_HDR and a VMM that hands over its guest's
virtio-net frames unchanged (``--fd N --vnet-hdr``) both put a
``struct virtio_net_hdr`` before each frame. With it, offload work crosses
the link both ways: the guest's TSO frames (up to 64 KiB) and partial
checksums come in, and the framer sends 64 KiB GSO frames with partial
checksums out (TCPv4 and TCPv6), so even at MTU 1500 one frame carries 64 KiB.

``VnetFraming`` is the shared part: the capabilities the framer reads, the
header put before each frame sent (all zero for a complete frame), and the
header taken off each frame read. A header from a peer we do not trust (a
VMM's socket) is checked (``wire.vnet.parse``): an unknown GSO type, a
``hdr_len`` or checksum offsets past the frame, are dropped and counted as
``bad-vnet-header``; the kernel's TAP headers are taken as they come.
"""

from ..interfaces import LinkCapabilities
from ..wire import MalformedFrame, ethernet, vnet

#: Largest read: a 64 KiB IP packet (IPv6's payload length leaves out its
#: 40-byte header), its Ethernet header and a v1 header.
VNET_READ_SIZE = 65535 + 40 + ethernet.HEADER_LEN + vnet.HEADER_V1_LEN


class VnetFraming:
    """Mixin for a FrameLink: frames travel behind a virtio-net header."""

    #: Bytes of header before each frame: 10 (legacy) or 12 (virtio 1.x).
    vnet_header_len = vnet.HEADER_LEN
    #: Whether the peer takes partial checksums and TSO frames from us.
    offloads = True
    #: Whether its TSO covers IPv6 too (a TAP whose kernel refused TUN_F_TSO6).
    tso6 = True
    #: Check every header read (False only for the local kernel's TAP).
    validate_vnet = True
    read_size = VNET_READ_SIZE

    @property
    def capabilities(self):
        return LinkCapabilities(max_frame=ethernet.HEADER_LEN + self.mtu,
                                vnet_header_len=self.vnet_header_len,
                                csum_offload=self.offloads, gso_tcpv4=self.offloads,
                                gso_tcpv6=self.offloads and self.tso6)

    def send_frame(self, frame, vnet_header=None):
        head = vnet_header or vnet.zero(self.vnet_header_len)
        if isinstance(frame, (bytes, bytearray, memoryview)):
            self._send_framed([head, frame])
        else:
            self._send_framed([head, *frame])

    def _strip_vnet(self, data):
        """The frame behind the header, or None (counted) for a bad one."""
        hlen = self.vnet_header_len
        if len(data) <= hlen + ethernet.HEADER_LEN:
            self.drops["short-vnet-frame"] += 1
            return None
        frame_len = len(data) - hlen
        if self.validate_vnet:
            try:
                _flags, gso_type, *_ = vnet.parse(data, frame_len)
            except MalformedFrame:
                self.drops["bad-vnet-header"] += 1
                return None
            if gso_type == vnet.GSO_NONE and frame_len > ethernet.HEADER_LEN + self.mtu:
                self.drops["oversize"] += 1
                return None
        return data[hlen:]
