"""UDP header view and builder."""

import struct

from . import MalformedFrame
from .checksum import checksum, pseudo_header_sum
from .ipv4 import PROTO_UDP

HEADER_LEN = 8
_HEADER = struct.Struct("!HHHH")


def parse(frame, ip):
    """Return (src_port, dst_port, payload_offset, payload_end)."""
    off = ip.payload_offset
    if ip.payload_end - off < HEADER_LEN:
        raise MalformedFrame("short-udp")
    sport, dport, length, _csum = _HEADER.unpack_from(frame, off)
    if length < HEADER_LEN or off + length > ip.payload_end:
        raise MalformedFrame("bad-udp-length")
    return sport, dport, off + HEADER_LEN, off + length


def header(sport, dport, payload_len):
    """UDP header with the checksum field zero: the framer fills it."""
    return _HEADER.pack(sport, dport, HEADER_LEN + payload_len, 0)


def build(src, dst, sport, dport, payload):
    """UDP header plus payload, with the checksum filled in."""
    length = HEADER_LEN + len(payload)
    head = _HEADER.pack(sport, dport, length, 0)
    csum = checksum(head + payload, pseudo_header_sum(src, dst, PROTO_UDP, length))
    return _HEADER.pack(sport, dport, length, csum or 0xFFFF) + payload
