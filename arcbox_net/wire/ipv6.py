"""IPv6 header view and builder, with the extension-header walk (RFC 8200).

Addresses are 16-byte ``bytes`` (``IPv6Address.packed``), as IPv4 ones are 4:
the framer picks the family by address length. ``parse`` walks hop-by-hop,
routing, destination-options and fragment headers with bounds checks, so the
``protocol`` it reports is the upper layer's and ``payload_offset`` indexes
that layer's header; anything it cannot walk raises ``MalformedFrame``.
"""

import ipaddress
import struct

from . import MalformedFrame
from .checksum import checksum, ones_sum

HEADER_LEN = 40
FRAGMENT_HEADER_LEN = 8
#: Every IPv6 link carries this much (RFC 8200 5); ICMPv6 errors fit in it.
MIN_MTU = 1280

NH_HOP_BY_HOP = 0
NH_TCP = 6
NH_UDP = 17
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_ESP = 50
NH_AH = 51
NH_ICMPV6 = 58
NH_NONE = 59
NH_DEST_OPTS = 60
#: The protocol numbers the framer's tables key on, under the IPv4 names.
PROTO_TCP = NH_TCP
PROTO_UDP = NH_UDP
PROTO_ICMPV6 = NH_ICMPV6

#: The issue-16 interface values: the guest network, the gateway (also DNS
#: and the host's loopback alias), the router's link-local address, the first
#: DHCPv6 address. StackConfig will carry them; these are their defaults.
DEFAULT_SUBNET = ipaddress.IPv6Network("fd00::/64")
DEFAULT_GATEWAY = ipaddress.IPv6Address("fd00::1")
ROUTER_LINK_LOCAL = ipaddress.IPv6Address("fe80::1")
DEFAULT_FIRST_GUEST = ipaddress.IPv6Address("fd00::2")

UNSPECIFIED = bytes(16)
ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
ALL_ROUTERS = ipaddress.IPv6Address("ff02::2").packed
ALL_DHCP_SERVERS = ipaddress.IPv6Address("ff02::1:2").packed   # and relay agents

#: More extension headers than this is an attack, not a packet (a chain of
#: tiny ones makes every frame a long walk).
MAX_EXTENSION_HEADERS = 8
_WALKED = (NH_HOP_BY_HOP, NH_ROUTING, NH_DEST_OPTS)
# Options the walk knows (RFC 8200 4.2): Pad1, PadN, Router Alert (MLD
# carries it), Jumbo Payload (rejected below). Any other option whose type's
# top two bits ask for the packet to be discarded is malformed to us.
_OPT_PAD1 = 0
_OPT_PADN = 1
_OPT_ROUTER_ALERT = 5
_OPT_JUMBO = 0xC2

_HEADER = struct.Struct("!IHBB16s16s")
_FRAGMENT = struct.Struct("!BBHI")


class Ipv6Header:
    """A parsed IPv6 packet; ``payload_offset``/``payload_end`` index the frame
    and bound the upper-layer message after any extension headers.

    ``protocol`` (also ``next_header``) is the upper layer's number;
    ``header_len`` counts the fixed header and every extension header, so
    ``payload_offset - header_len`` is where the packet starts, as for IPv4.
    ``ttl`` is the hop limit under IPv4's name for code shared by families.
    """

    __slots__ = (
        "dst",
        "extensions",
        "flow_label",
        "fragment_offset",
        "fragmented",
        "header_len",
        "hop_limit",
        "ident",
        "more_fragments",
        "next_header",
        "payload_end",
        "payload_offset",
        "protocol",
        "src",
        "total_len",
        "traffic_class",
        "ttl",
    )

    def payload(self, frame):
        return frame[self.payload_offset:self.payload_end]


def _check_options(frame, start, end):
    """Walk the TLV options of a hop-by-hop or destination-options header."""
    pos = start
    while pos < end:
        kind = frame[pos]
        if kind == _OPT_PAD1:
            pos += 1
            continue
        if pos + 2 > end:
            raise MalformedFrame("ipv6-bad-option", "option header past its extension")
        size = frame[pos + 1]
        if pos + 2 + size > end:
            raise MalformedFrame("ipv6-bad-option", "option data past its extension")
        if kind == _OPT_JUMBO:
            raise MalformedFrame("ipv6-jumbogram")
        if kind not in (_OPT_PADN, _OPT_ROUTER_ALERT) and kind >> 6:
            raise MalformedFrame("ipv6-unknown-option", f"type {kind}")
        pos += 2 + size


def parse(frame, offset):
    """Parse the IPv6 packet at ``offset``; raise MalformedFrame on nonsense.

    Trailing Ethernet padding beyond the payload length is ignored. A packet
    still to be routed (a routing header with segments left) is refused: the
    stack is its first hop, never a source-routing relay (RFC 5095).
    """
    if len(frame) - offset < HEADER_LEN:
        raise MalformedFrame("short-ipv6")
    word, payload_len, nh, hop_limit, src, dst = _HEADER.unpack_from(frame, offset)
    if word >> 28 != 6:
        raise MalformedFrame("bad-ip-version")
    end = offset + HEADER_LEN + payload_len
    if end > len(frame):
        raise MalformedFrame("truncated-ipv6")
    h = Ipv6Header()
    h.src = bytes(src)
    h.dst = bytes(dst)
    h.hop_limit = h.ttl = hop_limit
    h.traffic_class = (word >> 20) & 0xFF
    h.flow_label = word & 0xFFFFF
    h.total_len = HEADER_LEN + payload_len
    h.payload_end = end
    h.fragmented = False
    h.fragment_offset = 0
    h.more_fragments = False
    h.ident = None
    extensions = []
    pos = offset + HEADER_LEN
    while True:
        if nh in _WALKED:
            if nh == NH_HOP_BY_HOP and extensions:
                raise MalformedFrame("ipv6-misplaced-hop-by-hop")
            if end - pos < 8:
                raise MalformedFrame("truncated-ipv6-extension", f"header {nh}")
            size = (frame[pos + 1] + 1) * 8
            if pos + size > end:
                raise MalformedFrame("truncated-ipv6-extension", f"header {nh}")
            if nh == NH_ROUTING:
                if frame[pos + 3]:
                    raise MalformedFrame("ipv6-source-routed")
            else:
                _check_options(frame, pos + 2, pos + size)
        elif nh == NH_FRAGMENT:
            if end - pos < FRAGMENT_HEADER_LEN:
                raise MalformedFrame("truncated-ipv6-extension", "fragment")
            _nh, _res, field, ident = _FRAGMENT.unpack_from(frame, pos)
            size = FRAGMENT_HEADER_LEN
            if field & 0xFFF9:
                # A real fragment (an atomic one, offset 0 and no M, is a whole
                # packet: RFC 6946). What follows may be a partial header: stop.
                h.fragmented = True
                h.fragment_offset = field & 0xFFF8
                h.more_fragments = bool(field & 1)
                h.ident = ident
                extensions.append(nh)
                nh = _nh
                pos += size
                break
            h.ident = ident
        else:
            break
        extensions.append(nh)
        if len(extensions) > MAX_EXTENSION_HEADERS:
            raise MalformedFrame("ipv6-too-many-extensions")
        nh = frame[pos]
        pos += size
    h.protocol = h.next_header = nh
    h.extensions = tuple(extensions)
    h.payload_offset = pos
    h.header_len = pos - offset
    return h


def build_header(src, dst, protocol, payload_len, ttl=64, ident=0, traffic_class=0,
                 flow_label=0):
    """A fixed IPv6 header; ``ttl`` is the hop limit and ``ident`` is unused
    (IPv6 has no identification outside a fragment header): the signature is
    ``ipv4.build_header``'s, so the framer's family table can call either."""
    if not 0 <= payload_len <= 0xFFFF:
        raise ValueError(f"IPv6 payload of {payload_len} bytes needs a jumbogram")
    word = (6 << 28) | ((traffic_class & 0xFF) << 20) | (flow_label & 0xFFFFF)
    return _HEADER.pack(word, payload_len, protocol, ttl, src, dst)


def pseudo_header_sum(src, dst, protocol, length):
    """Partial sum of the IPv6 pseudo-header (RFC 8200 8.1): source,
    destination, 32-bit upper-layer length, 24 zero bits, next header."""
    return ones_sum(src + dst, protocol + (length >> 16) + (length & 0xFFFF))


def upper_checksum(src, dst, protocol, message):
    """The checksum field value of an upper-layer message (its field zero)."""
    return checksum(message, pseudo_header_sum(src, dst, protocol, len(message)))


def fragment(src, dst, protocol, payload, mtu, ident, ttl=64):
    """Split an upper-layer message into IPv6 fragments of at most ``mtu``
    bytes (RFC 8200 4.5), as the stack does when it is the packet's source
    (a UDP reply from a host socket larger than the guest's link).

    Returns (header, chunk) pairs like ``ipv4.fragment``; each header is the
    fixed header and a fragment header.
    """
    step = (mtu - HEADER_LEN - FRAGMENT_HEADER_LEN) & ~7
    if step <= 0:
        raise ValueError(f"MTU {mtu} leaves no room for a fragment")
    out = []
    view = memoryview(payload)
    for offset in range(0, len(payload), step):
        chunk = view[offset:offset + step]
        more = offset + step < len(payload)
        head = build_header(src, dst, NH_FRAGMENT, FRAGMENT_HEADER_LEN + len(chunk), ttl)
        frag = _FRAGMENT.pack(protocol, 0, offset | int(more), ident & 0xFFFFFFFF)
        out.append((head + frag, bytes(chunk)))
    return out


def quote(frame, ip):
    """What an ICMPv6 error about this packet quotes: as much of it as fits
    in a minimum-MTU error (RFC 4443 2.4 (c)), as bytes that outlive the frame."""
    start = ip.payload_offset - ip.header_len
    room = MIN_MTU - HEADER_LEN - 8
    return bytes(frame[start:min(start + room, ip.payload_end)])


# -- addresses -------------------------------------------------------------

def is_multicast(address):
    return address[0] == 0xFF


def is_link_local(address):
    """fe80::/10 (unicast link-local)."""
    return address[0] == 0xFE and address[1] & 0xC0 == 0x80


def is_unspecified(address):
    return address == UNSPECIFIED


def solicited_node(address):
    """The solicited-node multicast group of an address (RFC 4291 2.7.1):
    ff02::1:ff00:0/104 and its low 24 bits; NS for it goes there."""
    return b"\xff\x02" + bytes(9) + b"\x01\xff" + bytes(address[13:16])


def multicast_mac(address):
    """The Ethernet address of an IPv6 multicast group (RFC 2464 7): 33:33 and
    the group's low 32 bits."""
    return b"\x33\x33" + bytes(address[12:16])


def interface_id(mac):
    """The modified EUI-64 interface identifier of a MAC (RFC 4291 2.5.1)."""
    return bytes((mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE, mac[3], mac[4], mac[5]))


def link_local_from_mac(mac):
    """The fe80::/64 address a guest forms from its MAC with EUI-64."""
    return b"\xfe\x80" + bytes(6) + interface_id(mac)


def packed(address):
    """16 bytes of an address given as text, IPv6Address or bytes."""
    if isinstance(address, bytes):
        if len(address) != 16:
            raise ValueError(f"{address!r} is not a 16-byte IPv6 address")
        return address
    return ipaddress.IPv6Address(address).packed
