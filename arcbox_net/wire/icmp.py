"""ICMPv4 messages the stack sends: echo replies and errors (unreachable, time exceeded)."""

import struct

from . import MalformedFrame
from .checksum import checksum

TYPE_ECHO_REPLY = 0
TYPE_DEST_UNREACH = 3
TYPE_ECHO_REQUEST = 8
TYPE_TIME_EXCEEDED = 11

# Destination-unreachable codes (RFC 792, RFC 1812).
CODE_NET_UNREACH = 0
CODE_HOST_UNREACH = 1
CODE_PROTO_UNREACH = 2
CODE_PORT_UNREACH = 3
CODE_FRAG_NEEDED = 4
CODE_ADMIN_PROHIBITED = 13

_HEADER = struct.Struct("!BBHHH")


def parse(frame, ip):
    """Return (type, code, ident, sequence) of the ICMP message in ``frame``."""
    off = ip.payload_offset
    if ip.payload_end - off < 8:
        raise MalformedFrame("short-icmp")
    icmp_type, code, _csum, ident, seq = _HEADER.unpack_from(frame, off)
    return icmp_type, code, ident, seq


def build(icmp_type, code, rest_of_header, body):
    """An ICMP message: 4 bytes of type-specific header, then ``body``."""
    raw = bytes((icmp_type, code, 0, 0)) + rest_of_header + body
    csum = checksum(raw)
    return raw[:2] + csum.to_bytes(2, "big") + raw[4:]


def echo_reply(request_icmp):
    """The reply to an echo request (same id, sequence and payload)."""
    return build(TYPE_ECHO_REPLY, 0, bytes(request_icmp[4:8]), bytes(request_icmp[8:]))


def error(icmp_type, code, quote, mtu=0):
    """An ICMP error (destination unreachable, time exceeded) quoting the
    offending packet's header and first 8 bytes (``ipv4.quote``); ``mtu`` is
    the next-hop MTU of "fragmentation needed"."""
    if icmp_type not in (TYPE_DEST_UNREACH, TYPE_TIME_EXCEEDED):
        raise ValueError(f"ICMP type {icmp_type} is not an error the stack sends")
    quoted = bytes(quote[:((quote[0] & 0x0F) * 4) + 8])
    # Only "fragmentation needed" has a next-hop MTU; in time exceeded (and any
    # other code) those bytes are unused and must be zero (RFC 792, RFC 1191).
    frag_needed = icmp_type == TYPE_DEST_UNREACH and code == CODE_FRAG_NEEDED
    rest = struct.pack("!HH", 0, mtu if frag_needed else 0)
    return build(icmp_type, code, rest, quoted)


def dest_unreachable(code, quote, mtu=0):
    """Destination unreachable quoting the offending packet."""
    return error(TYPE_DEST_UNREACH, code, quote, mtu)
