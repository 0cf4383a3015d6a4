"""The virtio-net header (``struct virtio_net_hdr``) that rides before a frame.

A TAP opened with IFF_VNET_HDR, a virtio-net device and a VMM that passes
its guest's frames through unchanged all put one before every frame. It says
what the frame still needs: NEEDS_CSUM (the L4 checksum field holds only the
pseudo-header sum; the receiver sums from ``csum_start`` and stores the
result at ``csum_start + csum_offset``) and, for a GSO frame, how to cut it
(``gso_type``, ``gso_size`` = the payload per segment, ``hdr_len`` = the bytes
of headers every segment repeats). All fields are little-endian (virtio 1.x).

The legacy header is 10 bytes; VERSION_1 (and MRG_RXBUF) add ``num_buffers``,
12 bytes in all. ``build`` makes either from the link's declared length.
"""

import struct

from . import MalformedFrame

#: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
HEADER = struct.Struct("<BBHHHH")
HEADER_LEN = HEADER.size
#: virtio_net_hdr_v1: the legacy fields plus num_buffers.
HEADER_V1_LEN = HEADER_LEN + 2

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

_KNOWN_GSO = (GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6)


def build(length, flags=0, gso_type=GSO_NONE, hdr_len=0, gso_size=0, csum_start=0,
          csum_offset=0):
    """A header of ``length`` bytes (10, or 12 with num_buffers = 1)."""
    head = HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    if length == HEADER_LEN:
        return head
    if length == HEADER_V1_LEN:
        return head + b"\x01\x00"
    raise ValueError(f"no virtio-net header is {length} bytes")


def zero(length):
    """The header of a complete frame: nothing left to do."""
    return build(length)


def parse(data, frame_len):
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) of a header
    before a frame of ``frame_len`` bytes; raise MalformedFrame when the header
    asks for something impossible (an unknown GSO type, offsets past the frame).
    """
    if len(data) < HEADER_LEN:
        raise MalformedFrame("short-vnet-header")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = HEADER.unpack_from(data)
    if gso_type & ~GSO_ECN not in _KNOWN_GSO:
        raise MalformedFrame("bad-vnet-gso-type")
    if flags & F_NEEDS_CSUM and csum_start + csum_offset + 2 > frame_len:
        raise MalformedFrame("bad-vnet-csum-offset")
    if gso_type != GSO_NONE and (hdr_len > frame_len or gso_size == 0):
        raise MalformedFrame("bad-vnet-gso")
    return flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
