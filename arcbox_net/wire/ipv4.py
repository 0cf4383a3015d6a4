"""IPv4 header view and builder."""

import struct

from . import MalformedFrame
from .checksum import checksum

HEADER_LEN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

_HEADER = struct.Struct("!BBHHHBBH4s4s")
_FLAG_MF = 0x2000
_FRAG_OFFSET_MASK = 0x1FFF


class Ipv4Header:
    """A parsed IPv4 header; ``payload_offset``/``payload_end`` index the frame."""

    __slots__ = (
        "src", "dst", "protocol", "ttl", "ident", "header_len", "total_len",
        "payload_offset", "payload_end", "fragmented", "tos",
    )

    def payload(self, frame):
        return frame[self.payload_offset:self.payload_end]


def parse(frame, offset):
    """Parse the IPv4 header at ``offset``; raise MalformedFrame on nonsense.

    Trailing Ethernet padding beyond total_len is ignored.
    """
    if len(frame) - offset < HEADER_LEN:
        raise MalformedFrame("short-ipv4")
    (ver_ihl, tos, total_len, ident, frag, ttl, proto, _csum, src,
     dst) = _HEADER.unpack_from(frame, offset)
    if ver_ihl >> 4 != 4:
        raise MalformedFrame("bad-ip-version")
    header_len = (ver_ihl & 0x0F) * 4
    if header_len < HEADER_LEN or total_len < header_len:
        raise MalformedFrame("bad-ipv4-length")
    if offset + total_len > len(frame):
        raise MalformedFrame("truncated-ipv4")
    h = Ipv4Header()
    h.src = src
    h.dst = dst
    h.protocol = proto
    h.ttl = ttl
    h.tos = tos
    h.ident = ident
    h.header_len = header_len
    h.total_len = total_len
    h.payload_offset = offset + header_len
    h.payload_end = offset + total_len
    h.fragmented = bool(frag & (_FLAG_MF | _FRAG_OFFSET_MASK))
    return h


def quote(frame, ip):
    """What an ICMP error about this packet quotes: its IP header and the first
    8 bytes of its payload (RFC 792), as bytes that outlive the frame."""
    start = ip.payload_offset - ip.header_len
    return bytes(frame[start:min(ip.payload_offset + 8, ip.payload_end)])


def build_header(src, dst, protocol, payload_len, ttl=64, ident=0,
                 dont_fragment=True, tos=0):
    frag = 0x4000 if dont_fragment else 0
    raw = _HEADER.pack(0x45, tos, HEADER_LEN + payload_len, ident & 0xFFFF,
                       frag, ttl, protocol, 0, src, dst)
    csum = checksum(raw)
    return raw[:10] + csum.to_bytes(2, "big") + raw[12:]


def fragment(src, dst, protocol, payload, mtu, ident, ttl=64):
    """Split an L4 payload into IPv4 fragments of at most ``mtu`` bytes, as a
    router does for a packet larger than the next link's MTU.

    Returns a list of (header, chunk) pairs; every chunk but the last is a
    multiple of 8 bytes and carries MF.
    """
    step = (mtu - HEADER_LEN) & ~7
    out = []
    view = memoryview(payload)
    for offset in range(0, len(payload), step):
        chunk = view[offset:offset + step]
        more = offset + step < len(payload)
        raw = _HEADER.pack(0x45, 0, HEADER_LEN + len(chunk), ident & 0xFFFF,
                           (offset >> 3) | (_FLAG_MF if more else 0), ttl, protocol, 0, src, dst)
        csum = checksum(raw)
        out.append((raw[:10] + csum.to_bytes(2, "big") + raw[12:], bytes(chunk)))
    return out
