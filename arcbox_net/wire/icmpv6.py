"""ICMPv6 (RFC 4443) and the Neighbor Discovery messages (RFC 4861, RFC 8106).

Unlike ICMPv4's, the ICMPv6 checksum covers the IPv6 pseudo-header, so every
builder takes the source and destination and returns a finished message.
Parsers take the message bytes (``ip.payload(frame)``) and raise
``MalformedFrame`` on anything short, misaligned or lying about a length;
NDP options with length 0 are malformed (RFC 4861 4.6).
"""

import struct

import attrs

from . import MalformedFrame, dnsname
from .checksum import checksum
from .ipv6 import HEADER_LEN as IPV6_HEADER_LEN
from .ipv6 import MIN_MTU, NH_ICMPV6, pseudo_header_sum

TYPE_DEST_UNREACH = 1
TYPE_PACKET_TOO_BIG = 2
TYPE_TIME_EXCEEDED = 3
TYPE_PARAM_PROBLEM = 4
TYPE_ECHO_REQUEST = 128
TYPE_ECHO_REPLY = 129
TYPE_MLD_QUERY = 130
TYPE_MLD_REPORT = 131
TYPE_MLD_DONE = 132
TYPE_ROUTER_SOLICIT = 133
TYPE_ROUTER_ADVERT = 134
TYPE_NEIGHBOR_SOLICIT = 135
TYPE_NEIGHBOR_ADVERT = 136
TYPE_REDIRECT = 137
TYPE_MLD2_REPORT = 143
ERROR_TYPES = (TYPE_DEST_UNREACH, TYPE_PACKET_TOO_BIG, TYPE_TIME_EXCEEDED, TYPE_PARAM_PROBLEM)

# Destination-unreachable codes (RFC 4443 3.1).
CODE_NO_ROUTE = 0
CODE_ADMIN_PROHIBITED = 1
CODE_BEYOND_SCOPE = 2
CODE_ADDR_UNREACH = 3
CODE_PORT_UNREACH = 4
CODE_SOURCE_POLICY = 5
CODE_REJECT_ROUTE = 6
# Time-exceeded codes (3.3).
CODE_HOP_LIMIT = 0
CODE_REASSEMBLY = 1
# Parameter-problem codes (3.4).
CODE_BAD_HEADER_FIELD = 0
CODE_UNKNOWN_NEXT_HEADER = 1
CODE_UNKNOWN_OPTION = 2

# NDP option types.
OPT_SOURCE_LL = 1
OPT_TARGET_LL = 2
OPT_PREFIX_INFO = 3
OPT_REDIRECTED = 4
OPT_MTU = 5
OPT_RDNSS = 25
OPT_DNSSL = 31

#: RFC 4861 7.2.4 / 4.4 flags of a Neighbor Advertisement.
NA_ROUTER = 0x80
NA_SOLICITED = 0x40
NA_OVERRIDE = 0x20
#: RA flags byte: managed address configuration, other configuration.
RA_MANAGED = 0x80
RA_OTHER = 0x40
#: Prefix information flags: on-link, autonomous address configuration.
PREFIX_ON_LINK = 0x80
PREFIX_AUTONOMOUS = 0x40
INFINITE = 0xFFFFFFFF

#: Room for the quoted packet in an error: the whole error fits in 1280 bytes.
QUOTE_ROOM = MIN_MTU - IPV6_HEADER_LEN - 8

_HEADER = struct.Struct("!BBHHH")
_RA = struct.Struct("!BBHBBHII")
_PREFIX = struct.Struct("!BBBBIII16s")


# -- plain ICMPv6 ----------------------------------------------------------

def build(src, dst, icmp_type, code, rest_of_header, body=b""):
    """A finished ICMPv6 message: 4 bytes of type-specific header, then ``body``."""
    raw = bytes((icmp_type, code, 0, 0)) + bytes(rest_of_header) + bytes(body)
    csum = checksum(raw, pseudo_header_sum(src, dst, NH_ICMPV6, len(raw)))
    return raw[:2] + csum.to_bytes(2, "big") + raw[4:]


def verify(src, dst, message):
    """Is the checksum of a received message right? (The sum over the
    pseudo-header and the message, checksum included, folds to 0xFFFF.)"""
    return checksum(message, pseudo_header_sum(src, dst, NH_ICMPV6, len(message))) == 0


def parse(frame, ip):
    """Return (type, code, ident, sequence) of the ICMPv6 message in ``frame``
    (ident and sequence mean something for echo only)."""
    off = ip.payload_offset
    if ip.payload_end - off < 8:
        raise MalformedFrame("short-icmpv6")
    icmp_type, code, _csum, ident, seq = _HEADER.unpack_from(frame, off)
    return icmp_type, code, ident, seq


def echo_request(src, dst, ident, seq, data=b""):
    return build(src, dst, TYPE_ECHO_REQUEST, 0, struct.pack("!HH", ident, seq), data)


def echo_reply(src, dst, request_icmp):
    """The reply to an echo request (same id, sequence and data), from ``src``."""
    if len(request_icmp) < 8:
        raise MalformedFrame("short-icmpv6")
    return build(src, dst, TYPE_ECHO_REPLY, 0, bytes(request_icmp[4:8]), bytes(request_icmp[8:]))


def error(src, dst, icmp_type, code, quote, mtu=0, pointer=0):
    """An ICMPv6 error quoting the offending packet (``ipv6.quote``), cut so
    the error fits the minimum MTU. ``mtu``: packet too big; ``pointer``:
    parameter problem (the offset of the bad field in the quoted packet)."""
    if icmp_type not in ERROR_TYPES:
        raise ValueError(f"ICMPv6 type {icmp_type} is not an error")
    if icmp_type == TYPE_PACKET_TOO_BIG:
        rest = struct.pack("!I", mtu)
    elif icmp_type == TYPE_PARAM_PROBLEM:
        rest = struct.pack("!I", pointer)
    else:
        rest = bytes(4)
    return build(src, dst, icmp_type, code, rest, bytes(quote[:QUOTE_ROOM]))


def dest_unreachable(src, dst, code, quote):
    return error(src, dst, TYPE_DEST_UNREACH, code, quote)


def packet_too_big(src, dst, mtu, quote):
    return error(src, dst, TYPE_PACKET_TOO_BIG, 0, quote, mtu=mtu)


def time_exceeded(src, dst, code, quote):
    return error(src, dst, TYPE_TIME_EXCEEDED, code, quote)


def parameter_problem(src, dst, code, pointer, quote):
    return error(src, dst, TYPE_PARAM_PROBLEM, code, quote, pointer=pointer)


def is_error(icmp_type):
    """Errors have types 0-127 (RFC 4443 2.1): never answer one with another."""
    return icmp_type < 128


# -- NDP options -----------------------------------------------------------

def parse_options(data):
    """[(type, body)] of a run of NDP options; ``body`` excludes the type and
    length bytes. Raises on length 0 or an option past the end."""
    out = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 2:
            raise MalformedFrame("ndp-truncated-option")
        kind, units = data[pos], data[pos + 1]
        if units == 0:
            raise MalformedFrame("ndp-zero-length-option", f"type {kind}")
        size = units * 8
        if pos + size > end:
            raise MalformedFrame("ndp-truncated-option", f"type {kind}")
        out.append((kind, bytes(data[pos + 2:pos + size])))
        pos += size
    return out


def _option(kind, body):
    """One option, zero-padded to a multiple of 8 bytes."""
    size = (len(body) + 2 + 7) // 8 * 8
    if size > 255 * 8:
        raise ValueError(f"NDP option {kind} of {len(body)} bytes is too long")
    return bytes((kind, size // 8)) + body + bytes(size - 2 - len(body))


def link_layer_option(kind, mac):
    return _option(kind, bytes(mac))


def mtu_option(mtu):
    return _option(OPT_MTU, struct.pack("!HI", 0, mtu))


@attrs.frozen
class PrefixInfo:
    prefix: bytes               # 16 bytes, bits past prefix_len zero
    prefix_len: int
    on_link: bool
    autonomous: bool
    valid_lifetime: int
    preferred_lifetime: int


def prefix_option(info):
    flags = (PREFIX_ON_LINK if info.on_link else 0) | (PREFIX_AUTONOMOUS if info.autonomous else 0)
    return bytes(_PREFIX.pack(OPT_PREFIX_INFO, 4, info.prefix_len, flags, info.valid_lifetime,
                              info.preferred_lifetime, 0, info.prefix))


def _prefix_from(body):
    if len(body) != 30:
        raise MalformedFrame("ndp-bad-option", "prefix information length")
    prefix_len, flags, valid, preferred, _res, prefix = struct.unpack("!BBIII16s", body)
    if prefix_len > 128:
        raise MalformedFrame("ndp-bad-option", "prefix length")
    return PrefixInfo(prefix, prefix_len, bool(flags & PREFIX_ON_LINK),
                      bool(flags & PREFIX_AUTONOMOUS), valid, preferred)


def rdnss_option(lifetime, servers):
    if not servers:
        raise ValueError("RDNSS needs at least one server")
    return _option(OPT_RDNSS, struct.pack("!HI", 0, lifetime) + b"".join(servers))


def dnssl_option(lifetime, names):
    if not names:
        raise ValueError("DNSSL needs at least one name")
    return _option(OPT_DNSSL, struct.pack("!HI", 0, lifetime) + dnsname.encode_list(names))


def _rdnss_from(body):
    # Length 3, 5, 7...: 8 bytes of header and 16 per server (RFC 8106 5.1).
    if len(body) < 22 or (len(body) - 6) % 16:
        raise MalformedFrame("ndp-bad-option", "RDNSS length")
    lifetime = struct.unpack_from("!I", body, 2)[0]
    return lifetime, tuple(body[i:i + 16] for i in range(6, len(body), 16))


def _dnssl_from(body):
    if len(body) < 14:
        raise MalformedFrame("ndp-bad-option", "DNSSL length")
    lifetime = struct.unpack_from("!I", body, 2)[0]
    try:
        names = dnsname.decode_list(body[6:], padded=True)
    except MalformedFrame as exc:
        raise MalformedFrame("ndp-bad-option", str(exc)) from None
    return lifetime, tuple(names)


def _link_layer(body):
    # Ethernet: 6 bytes of address in an 8-byte option (RFC 2464 6).
    if len(body) != 6:
        raise MalformedFrame("ndp-bad-option", "link-layer address length")
    return body


# -- NDP messages ----------------------------------------------------------

@attrs.frozen
class RouterSolicitation:
    source_mac: bytes | None


@attrs.frozen
class RouterAdvertisement:
    hop_limit: int
    managed: bool
    other: bool
    router_lifetime: int
    reachable_time: int
    retrans_timer: int
    source_mac: bytes | None = None
    mtu: int | None = None
    prefixes: tuple = ()
    #: (lifetime, (16-byte address, ...)) per RDNSS option.
    rdnss: tuple = ()
    #: (lifetime, (name, ...)) per DNSSL option.
    dnssl: tuple = ()


@attrs.frozen
class NeighborSolicitation:
    target: bytes
    source_mac: bytes | None


@attrs.frozen
class NeighborAdvertisement:
    target: bytes
    router: bool
    solicited: bool
    override: bool
    target_mac: bytes | None


def _expect(message, icmp_type, min_len):
    if len(message) < min_len:
        raise MalformedFrame("ndp-short", f"type {icmp_type}")
    if message[0] != icmp_type:
        raise MalformedFrame("ndp-wrong-type", f"{message[0]} is not {icmp_type}")
    if message[1] != 0:
        raise MalformedFrame("ndp-bad-code")


def _single(options, kind, decode):
    found = [body for k, body in options if k == kind]
    return decode(found[0]) if found else None


def router_solicitation(src, dst, source_mac=None):
    opts = link_layer_option(OPT_SOURCE_LL, source_mac) if source_mac else b""
    return build(src, dst, TYPE_ROUTER_SOLICIT, 0, bytes(4), opts)


def parse_router_solicitation(message):
    _expect(message, TYPE_ROUTER_SOLICIT, 8)
    options = parse_options(message[8:])
    return RouterSolicitation(_single(options, OPT_SOURCE_LL, _link_layer))


def router_advertisement(src, dst, *, hop_limit=64, managed=False, other=False,
                         router_lifetime=1800, reachable_time=0, retrans_timer=0,
                         source_mac=None, mtu=None, prefixes=(), rdnss=(), dnssl=()):
    """A finished RA. ``rdnss``: (lifetime, servers) pairs; ``dnssl``:
    (lifetime, names) pairs; ``prefixes``: PrefixInfo values."""
    flags = (RA_MANAGED if managed else 0) | (RA_OTHER if other else 0)
    head = _RA.pack(TYPE_ROUTER_ADVERT, 0, 0, hop_limit, flags, router_lifetime,
                    reachable_time, retrans_timer)
    opts = []
    if source_mac:
        opts.append(link_layer_option(OPT_SOURCE_LL, source_mac))
    if mtu is not None:
        opts.append(mtu_option(mtu))
    opts += [prefix_option(p) for p in prefixes]
    opts += [rdnss_option(lifetime, servers) for lifetime, servers in rdnss]
    opts += [dnssl_option(lifetime, names) for lifetime, names in dnssl]
    return build(src, dst, TYPE_ROUTER_ADVERT, 0, head[4:8], head[8:] + b"".join(opts))


def parse_router_advertisement(message):
    _expect(message, TYPE_ROUTER_ADVERT, 16)
    _t, _c, _s, hop_limit, flags, lifetime, reachable, retrans = _RA.unpack_from(message)
    options = parse_options(message[16:])
    mtu = _single(options, OPT_MTU, _mtu_from)
    return RouterAdvertisement(
        hop_limit, bool(flags & RA_MANAGED), bool(flags & RA_OTHER), lifetime, reachable,
        retrans, _single(options, OPT_SOURCE_LL, _link_layer), mtu,
        tuple(_prefix_from(b) for k, b in options if k == OPT_PREFIX_INFO),
        tuple(_rdnss_from(b) for k, b in options if k == OPT_RDNSS),
        tuple(_dnssl_from(b) for k, b in options if k == OPT_DNSSL))


def _mtu_from(body):
    if len(body) != 6:
        raise MalformedFrame("ndp-bad-option", "MTU length")
    return struct.unpack_from("!I", body, 2)[0]


def neighbor_solicitation(src, dst, target, source_mac=None):
    opts = link_layer_option(OPT_SOURCE_LL, source_mac) if source_mac else b""
    return build(src, dst, TYPE_NEIGHBOR_SOLICIT, 0, bytes(4), bytes(target) + opts)


def parse_neighbor_solicitation(message):
    _expect(message, TYPE_NEIGHBOR_SOLICIT, 24)
    options = parse_options(message[24:])
    return NeighborSolicitation(bytes(message[8:24]),
                                _single(options, OPT_SOURCE_LL, _link_layer))


def neighbor_advertisement(src, dst, target, target_mac=None, *, router=False,
                           solicited=False, override=True):
    flags = (NA_ROUTER if router else 0) | (NA_SOLICITED if solicited else 0) \
        | (NA_OVERRIDE if override else 0)
    opts = link_layer_option(OPT_TARGET_LL, target_mac) if target_mac else b""
    return build(src, dst, TYPE_NEIGHBOR_ADVERT, 0, bytes((flags, 0, 0, 0)),
                 bytes(target) + opts)


def parse_neighbor_advertisement(message):
    _expect(message, TYPE_NEIGHBOR_ADVERT, 24)
    flags = message[4]
    options = parse_options(message[24:])
    return NeighborAdvertisement(bytes(message[8:24]), bool(flags & NA_ROUTER),
                                 bool(flags & NA_SOLICITED), bool(flags & NA_OVERRIDE),
                                 _single(options, OPT_TARGET_LL, _link_layer))
