"""IPv6 and ICMPv6/NDP wire formats: builders checked against dpkt and an
independent RFC 1071 sum, the extension-header walk, every malformed path."""

import ipaddress
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcbox_net.wire import MalformedFrame, dnsname, ethernet, icmpv6, ipv6

GUEST_LL = ipaddress.IPv6Address("fe80::5054:ff:fe12:3456").packed
GUEST = ipaddress.IPv6Address("fd00::2").packed
GATEWAY = ipaddress.IPv6Address("fd00::1").packed
ROUTER = ipaddress.IPv6Address("fe80::1").packed
GUEST_MAC = bytes.fromhex("525400123456")
GW_MAC = bytes.fromhex("02abcb000001")


def _rfc1071(data):
    """Word-by-word one's-complement sum, complemented: the checksum field."""
    if len(data) % 2:
        data += b"\0"
    total = sum((data[i] << 8) | data[i + 1] for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src, dst, nh, length):
    return src + dst + struct.pack("!I", length) + b"\0\0\0" + bytes([nh])


def _check_icmpv6_sum(src, dst, message):
    zeroed = message[:2] + b"\0\0" + message[4:]
    assert struct.unpack_from("!H", message, 2)[0] == \
        _rfc1071(_pseudo(src, dst, 58, len(message)) + zeroed)


def _packet(src, dst, nh, payload, hop_limit=64):
    return ipv6.build_header(src, dst, nh, len(payload), ttl=hop_limit) + payload


# -- IPv6 header -----------------------------------------------------------

def test_build_header_matches_dpkt_and_parse_round_trips():
    payload = b"x" * 100
    raw = ipv6.build_header(GUEST, GATEWAY, 17, len(payload), ttl=33, traffic_class=0xB8,
                            flow_label=0x12345) + payload
    packet = dpkt.ip6.IP6(raw)
    assert (packet.v, packet.fc, packet.flow, packet.plen, packet.nxt, packet.hlim) == \
        (6, 0xB8, 0x12345, 100, 17, 33)
    assert (packet.src, packet.dst) == (GUEST, GATEWAY)
    frame = b"E" * 14 + raw + b"\0" * 6     # Ethernet padding after the payload
    h = ipv6.parse(frame, 14)
    assert (h.src, h.dst, h.protocol, h.next_header, h.hop_limit, h.ttl) == \
        (GUEST, GATEWAY, 17, 17, 33, 33)
    assert (h.traffic_class, h.flow_label) == (0xB8, 0x12345)
    assert (h.payload_offset, h.payload_end, h.header_len) == (54, 154, 40)
    assert h.payload(frame) == payload and not h.fragmented and h.extensions == ()


def test_build_header_refuses_a_jumbogram():
    with pytest.raises(ValueError):
        ipv6.build_header(GUEST, GATEWAY, 17, 65536)


def test_pseudo_header_sum_is_rfc_8200_8_1():
    for length in (0, 1, 8, 1500, 65535, 70000):
        total = ipv6.pseudo_header_sum(GUEST, GATEWAY, 17, length)
        assert ~total & 0xFFFF == _rfc1071(_pseudo(GUEST, GATEWAY, 17, length))


def test_udp_checksum_over_the_pseudo_header_matches_dpkt():
    body = b"hello over ipv6!"
    udp_head = struct.pack("!HHHH", 5000, 53, 8 + len(body), 0)
    csum = ipv6.upper_checksum(GUEST, GATEWAY, 17, udp_head + body)
    ours = _packet(GUEST, GATEWAY, 17, udp_head[:6] + struct.pack("!H", csum) + body)
    # dpkt fills the checksum of a UDP datagram whose sum is 0 from its own pseudo-header.
    theirs = dpkt.ip6.IP6(src=GUEST, dst=GATEWAY, nxt=17, hlim=64,
                          data=dpkt.udp.UDP(sport=5000, dport=53, ulen=8 + len(body),
                                                         data=body))
    theirs.plen = len(theirs.data)
    assert bytes(theirs) == ours


def _ext(nh, body):
    """An extension header with ``body`` padded to its 8-byte multiple."""
    size = (len(body) + 2 + 7) // 8 * 8
    return bytes([nh, size // 8 - 1]) + body + bytes(size - 2 - len(body))


def test_the_walk_goes_through_every_extension_kind_to_the_upper_layer():
    udp_payload = struct.pack("!HHHH", 1, 2, 8, 0)
    hop = _ext(60, b"\x05\x02\x00\x00")                 # router alert
    dest = _ext(43, b"\x01\x02\x00\x00")                 # PadN
    routing = _ext(44, bytes([0, 0]) + bytes(4))         # type 0, segments left 0
    frag = bytes([17, 0, 0, 0]) + struct.pack("!I", 77)  # atomic fragment
    raw = _packet(GUEST, GATEWAY, 0, hop + dest + routing + frag + udp_payload)
    h = ipv6.parse(raw, 0)
    assert h.protocol == 17 and h.extensions == (0, 60, 43, 44)
    assert h.payload(raw) == udp_payload and not h.fragmented and h.ident == 77
    assert h.header_len == 40 + len(hop + dest + routing + frag)
    theirs = dpkt.ip6.IP6(raw)
    assert theirs.p == 17 and bytes(theirs.data) == udp_payload


def test_a_real_fragment_is_flagged_and_not_walked_further():
    first = bytes([17, 0]) + struct.pack("!HI", 0 | 1, 9) + b"\xff" * 16
    h = ipv6.parse(_packet(GUEST, GATEWAY, 44, first), 0)
    assert h.fragmented and h.more_fragments and h.fragment_offset == 0
    assert h.protocol == 17 and h.ident == 9
    later = bytes([0, 0]) + struct.pack("!HI", 1232, 9) + b"\xff" * 16
    h = ipv6.parse(_packet(GUEST, GATEWAY, 44, later), 0)
    # Next header 0 after a non-first fragment is data, not a header to walk.
    assert h.fragmented and not h.more_fragments and h.fragment_offset == 1232
    assert h.protocol == 0


def test_no_next_header_ends_the_walk():
    h = ipv6.parse(_packet(GUEST, GATEWAY, 59, b""), 0)
    assert h.protocol == 59 and h.payload_offset == h.payload_end == 40


@pytest.mark.parametrize("raw, reason", [
    (b"\x60" + bytes(38), "short-ipv6"),
    (b"\x40" + bytes(39), "bad-ip-version"),
    (ipv6.build_header(GUEST, GATEWAY, 17, 10) + bytes(9), "truncated-ipv6"),
    (_packet(GUEST, GATEWAY, 0, bytes(4)), "truncated-ipv6-extension"),
    (_packet(GUEST, GATEWAY, 60, bytes([17, 1]) + bytes(6)), "truncated-ipv6-extension"),
    (_packet(GUEST, GATEWAY, 44, bytes(7)), "truncated-ipv6-extension"),
    (_packet(GUEST, GATEWAY, 60, _ext(0, bytes(6))), "ipv6-misplaced-hop-by-hop"),
    (_packet(GUEST, GATEWAY, 43, _ext(17, bytes([0, 1]) + bytes(4))), "ipv6-source-routed"),
    (_packet(GUEST, GATEWAY, 0, _ext(17, b"\x01\x09" + bytes(4))), "ipv6-bad-option"),
    (_packet(GUEST, GATEWAY, 0, _ext(17, b"\x00\x00\x00\x00\x00\x01")), "ipv6-bad-option"),
    (_packet(GUEST, GATEWAY, 0, _ext(17, b"\xc2\x04" + bytes(4))), "ipv6-jumbogram"),
    (_packet(GUEST, GATEWAY, 60, _ext(17, b"\x80\x04" + bytes(4))), "ipv6-unknown-option"),
    (_packet(GUEST, GATEWAY, 60, b"".join(_ext(60, bytes(6)) for _ in range(9)) + bytes(8)),
     "ipv6-too-many-extensions"),
])
def test_malformed_packets_raise_with_their_reason(raw, reason):
    with pytest.raises(MalformedFrame) as info:
        ipv6.parse(raw, 0)
    assert info.value.reason == reason


def test_an_unknown_option_that_may_be_skipped_is_skipped():
    h = ipv6.parse(_packet(GUEST, GATEWAY, 60, _ext(17, b"\x3e\x04" + bytes(4))), 0)
    assert h.protocol == 17


def _walk_reference(raw):
    """An independent, slow walk: the upper-layer protocol and offset, or None."""
    if len(raw) < 40 or raw[0] >> 4 != 6:
        return None
    end = 40 + int.from_bytes(raw[4:6], "big")
    if end > len(raw):
        return None
    nh, pos = raw[6], 40
    while nh in (0, 43, 60, 44):
        if pos + 8 > end:
            return None
        if nh == 44:
            return "fragment" if int.from_bytes(raw[pos + 2:pos + 4], "big") & 0xFFF9 else None
        nh, pos = raw[pos], pos + (raw[pos + 1] + 1) * 8
        if pos > end:
            return None
    return nh, pos


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=120), st.integers(0, 3), st.sampled_from([0, 43, 44, 59, 60, 17]))
def test_parse_never_raises_anything_but_malformed_frame(tail, chop, nh):
    raw = ipv6.build_header(GUEST, GATEWAY, nh, len(tail)) + tail
    raw = raw[:len(raw) - chop] if chop else raw
    try:
        h = ipv6.parse(raw, 0)
    except MalformedFrame:
        return
    assert 40 <= h.payload_offset <= h.payload_end <= len(raw)
    ref = _walk_reference(raw)
    if ref not in (None, "fragment"):
        assert (h.protocol, h.payload_offset) == ref


def test_fragments_reassemble_to_the_payload_and_fit_the_mtu():
    payload = bytes(range(256)) * 12
    frags = ipv6.fragment(GATEWAY, GUEST, 17, payload, 1280, ident=0xABCDEF01)
    assert len(frags) == 3
    out = b""
    for i, (head, chunk) in enumerate(frags):
        assert len(head) + len(chunk) <= 1280
        h = ipv6.parse(head + chunk, 0)
        assert h.fragmented and h.protocol == 17 and h.ident == 0xABCDEF01
        assert h.fragment_offset == len(out) and h.more_fragments == (i < 2)
        assert len(chunk) % 8 == 0 or i == 2
        out += chunk
    assert out == payload
    with pytest.raises(ValueError):
        ipv6.fragment(GATEWAY, GUEST, 17, payload, 48, 1)


def test_quote_keeps_as_much_as_fits_a_minimum_mtu_error():
    big = _packet(GUEST, GATEWAY, 17, bytes(3000))
    h = ipv6.parse(b"E" * 14 + big, 14)
    quoted = ipv6.quote(b"E" * 14 + big, h)
    assert quoted == big[:1232]
    err = icmpv6.packet_too_big(GATEWAY, GUEST, 1280, quoted)
    assert 40 + len(err) == 1280
    small = _packet(GUEST, GATEWAY, 17, bytes(20))
    assert ipv6.quote(small + b"\0" * 10, ipv6.parse(small + b"\0" * 10, 0)) == small


def test_address_helpers():
    target = ipaddress.IPv6Address("fd00::1:2:3456").packed
    assert ipaddress.IPv6Address(ipv6.solicited_node(target)) == \
        ipaddress.IPv6Address("ff02::1:ff02:3456")
    assert ipv6.multicast_mac(ipv6.ALL_NODES) == bytes.fromhex("333300000001")
    assert ipv6.multicast_mac(ipv6.solicited_node(target)) == bytes.fromhex("3333ff023456")
    assert ipv6.is_multicast(ipv6.ALL_ROUTERS) and not ipv6.is_multicast(GUEST)
    assert ipv6.is_link_local(ROUTER) and ipv6.is_link_local(GUEST_LL)
    assert not ipv6.is_link_local(GUEST) and not ipv6.is_link_local(b"\xfe\xc0" + bytes(14))
    assert ipv6.is_unspecified(bytes(16)) and not ipv6.is_unspecified(GUEST)
    assert ipv6.link_local_from_mac(GUEST_MAC) == GUEST_LL
    assert ipv6.packed("fd00::1") == GATEWAY == ipv6.packed(ipaddress.IPv6Address("fd00::1"))
    with pytest.raises(ValueError):
        ipv6.packed(b"\0" * 4)
    assert (str(ipv6.DEFAULT_SUBNET), str(ipv6.DEFAULT_GATEWAY), str(ipv6.ROUTER_LINK_LOCAL),
            str(ipv6.DEFAULT_FIRST_GUEST)) == ("fd00::/64", "fd00::1", "fe80::1", "fd00::2")


# -- ICMPv6 ----------------------------------------------------------------

def test_echo_reply_answers_a_dpkt_echo_request():
    echo = dpkt.icmp6.ICMP6(type=128, code=0, data=dpkt.icmp6.ICMP6.Echo(id=0x1234, seq=7,
                                                                          data=b"ping" * 10))
    packet = dpkt.ip6.IP6(src=GUEST, dst=GATEWAY, nxt=58, hlim=64, data=echo)
    packet.plen = len(packet.data)
    raw = bytes(packet)
    h = ipv6.parse(raw, 0)
    request = h.payload(raw)
    assert icmpv6.verify(GUEST, GATEWAY, request)     # dpkt's sum agrees with ours
    assert icmpv6.parse(raw, h) == (128, 0, 0x1234, 7)
    reply = icmpv6.echo_reply(GATEWAY, GUEST, request)
    _check_icmpv6_sum(GATEWAY, GUEST, reply)
    theirs = dpkt.icmp6.ICMP6(reply)
    assert (theirs.type, theirs.data.id, theirs.data.seq, theirs.data.data) == \
        (129, 0x1234, 7, b"ping" * 10)
    assert icmpv6.echo_request(GUEST, GATEWAY, 0x1234, 7, b"ping" * 10) == request
    with pytest.raises(MalformedFrame):
        icmpv6.echo_reply(GATEWAY, GUEST, request[:7])


def test_parse_refuses_a_short_message():
    raw = _packet(GUEST, GATEWAY, 58, b"\x80\x00\x00\x00")
    with pytest.raises(MalformedFrame) as info:
        icmpv6.parse(raw, ipv6.parse(raw, 0))
    assert info.value.reason == "short-icmpv6"


@pytest.mark.parametrize("build, kind, code, field", [
    (lambda q: icmpv6.dest_unreachable(GATEWAY, GUEST, icmpv6.CODE_PORT_UNREACH, q), 1, 4, 0),
    (lambda q: icmpv6.dest_unreachable(GATEWAY, GUEST, icmpv6.CODE_ADMIN_PROHIBITED, q), 1, 1, 0),
    (lambda q: icmpv6.packet_too_big(GATEWAY, GUEST, 1400, q), 2, 0, 1400),
    (lambda q: icmpv6.time_exceeded(GATEWAY, GUEST, icmpv6.CODE_HOP_LIMIT, q), 3, 0, 0),
    (lambda q: icmpv6.parameter_problem(GATEWAY, GUEST, 1, 6, q), 4, 1, 6),
])
def test_errors_carry_type_code_field_quote_and_checksum(build, kind, code, field):
    offending = _packet(GUEST, ipaddress.IPv6Address("2001:db8::1").packed, 17, bytes(16))
    quoted = ipv6.quote(offending, ipv6.parse(offending, 0))
    message = build(quoted)
    _check_icmpv6_sum(GATEWAY, GUEST, message)
    assert (message[0], message[1], struct.unpack_from("!I", message, 4)[0]) == (kind, code, field)
    assert message[8:] == offending
    assert icmpv6.is_error(kind)
    theirs = dpkt.icmp6.ICMP6(message)
    assert theirs.type == kind


def test_error_refuses_a_non_error_type_and_cuts_a_long_quote():
    with pytest.raises(ValueError):
        icmpv6.error(GATEWAY, GUEST, 128, 0, b"")
    assert len(icmpv6.time_exceeded(GATEWAY, GUEST, 0, bytes(5000))) == 1280 - 40
    assert not icmpv6.is_error(icmpv6.TYPE_ECHO_REQUEST)


def test_verify_catches_one_flipped_bit():
    message = icmpv6.echo_request(GUEST, GATEWAY, 1, 2, b"abc")
    assert icmpv6.verify(GUEST, GATEWAY, message)
    assert not icmpv6.verify(GUEST, GATEWAY, message[:-1] + b"b")
    assert not icmpv6.verify(GUEST_LL, GATEWAY, message)


# -- NDP -------------------------------------------------------------------

def test_neighbor_solicitation_round_trip_and_sum():
    dst = ipv6.solicited_node(GATEWAY)
    ns = icmpv6.neighbor_solicitation(GUEST_LL, dst, GATEWAY, GUEST_MAC)
    _check_icmpv6_sum(GUEST_LL, dst, ns)
    assert len(ns) == 32 and ns[24:] == b"\x01\x01" + GUEST_MAC
    parsed = icmpv6.parse_neighbor_solicitation(ns)
    assert parsed == icmpv6.NeighborSolicitation(GATEWAY, GUEST_MAC)
    assert icmpv6.parse_neighbor_solicitation(
        icmpv6.neighbor_solicitation(bytes(16), dst, GATEWAY)).source_mac is None


def test_neighbor_advertisement_round_trip_and_flags():
    na = icmpv6.neighbor_advertisement(GATEWAY, GUEST_LL, GATEWAY, GW_MAC, router=True,
                                       solicited=True)
    _check_icmpv6_sum(GATEWAY, GUEST_LL, na)
    assert na[4] == 0xE0 and na[24:] == b"\x02\x01" + GW_MAC
    assert icmpv6.parse_neighbor_advertisement(na) == icmpv6.NeighborAdvertisement(
        GATEWAY, True, True, True, GW_MAC)
    plain = icmpv6.parse_neighbor_advertisement(
        icmpv6.neighbor_advertisement(GUEST, GATEWAY, GUEST, override=False))
    assert (plain.router, plain.solicited, plain.override, plain.target_mac) == \
        (False, False, False, None)


def test_router_solicitation_round_trip():
    rs = icmpv6.router_solicitation(GUEST_LL, ipv6.ALL_ROUTERS, GUEST_MAC)
    _check_icmpv6_sum(GUEST_LL, ipv6.ALL_ROUTERS, rs)
    assert icmpv6.parse_router_solicitation(rs).source_mac == GUEST_MAC
    assert icmpv6.parse_router_solicitation(
        icmpv6.router_solicitation(bytes(16), ipv6.ALL_ROUTERS)).source_mac is None


def _full_ra():
    prefix = icmpv6.PrefixInfo(ipaddress.IPv6Address("fd00::").packed, 64, True, True,
                               2592000, 604800)
    return icmpv6.router_advertisement(
        ROUTER, ipv6.ALL_NODES, managed=True, other=True, router_lifetime=1800,
        reachable_time=30000, retrans_timer=1000, source_mac=GW_MAC, mtu=1500,
        prefixes=(prefix,), rdnss=((1800, (GATEWAY,)),),
        dnssl=((1800, ("example.internal", "corp.example")),)), prefix


def test_router_advertisement_round_trip_with_every_option():
    ra, prefix = _full_ra()
    _check_icmpv6_sum(ROUTER, ipv6.ALL_NODES, ra)
    parsed = icmpv6.parse_router_advertisement(ra)
    assert parsed == icmpv6.RouterAdvertisement(
        64, True, True, 1800, 30000, 1000, GW_MAC, 1500, (prefix,), ((1800, (GATEWAY,)),),
        ((1800, ("example.internal", "corp.example")),))
    # Byte layout of the fixed part and the option lengths (RFC 4861 4.2, 4.6; RFC 8106 5).
    assert ra[4:8] == bytes([64, 0xC0]) + struct.pack("!H", 1800)
    kinds = [(k, len(b) + 2) for k, b in icmpv6.parse_options(ra[16:])]
    assert kinds == [(1, 8), (5, 8), (3, 32), (25, 24), (31, 40)]
    assert len(ra) % 8 == 0


def test_router_advertisement_without_options_and_flags():
    ra = icmpv6.router_advertisement(ROUTER, GUEST_LL, router_lifetime=0)
    parsed = icmpv6.parse_router_advertisement(ra)
    assert (parsed.managed, parsed.other, parsed.router_lifetime, parsed.mtu,
            parsed.prefixes, parsed.rdnss, parsed.dnssl, parsed.source_mac) == \
        (False, False, 0, None, (), (), (), None)


def _with_options(head, options, src=ROUTER, dst=ipv6.ALL_NODES):
    raw = head + options
    return icmpv6.build(src, dst, raw[0], raw[1], raw[4:8], raw[8:])


_RA_HEAD = bytes([134, 0, 0, 0, 64, 0xC0, 7, 8]) + bytes(8)


@pytest.mark.parametrize("options, reason", [
    (b"\x01\x00" + bytes(6), "ndp-zero-length-option"),
    (b"\x01\x02" + bytes(6), "ndp-truncated-option"),
    (b"\x01", "ndp-truncated-option"),
    (b"\x01\x02" + bytes(14), "ndp-bad-option"),                   # 14-byte link-layer address
    (b"\x05\x02" + bytes(14), "ndp-bad-option"),                   # MTU of 16 bytes
    (b"\x03\x03" + bytes(22), "ndp-bad-option"),                   # prefix info of 24 bytes
    (b"\x03\x04\x81" + bytes(29), "ndp-bad-option"),               # prefix length 129
    (b"\x19\x01" + bytes(6), "ndp-bad-option"),                    # RDNSS with no server
    (b"\x19\x02" + bytes(14), "ndp-bad-option"),                   # RDNSS of even length
    (b"\x1f\x01" + bytes(6), "ndp-bad-option"),                    # DNSSL with no name
    (b"\x1f\x02" + bytes(6) + b"\x09ab\x00" + bytes(4), "ndp-bad-option"),   # label overrun
    (b"\x1f\x02" + bytes(6) + b"\xc0\x0c" + bytes(6), "ndp-bad-option"),     # compression
    (b"\x1f\x02" + bytes(6) + b"\x00\x01a\x00" + bytes(4), "ndp-bad-option"),  # data after padding
])
def test_malformed_ra_options_raise(options, reason):
    with pytest.raises(MalformedFrame) as info:
        icmpv6.parse_router_advertisement(_with_options(_RA_HEAD, options))
    assert info.value.reason == reason


@pytest.mark.parametrize("parser, message, reason", [
    (icmpv6.parse_neighbor_solicitation, bytes([135, 0]) + bytes(20), "ndp-short"),
    (icmpv6.parse_neighbor_solicitation, bytes([136, 0]) + bytes(22), "ndp-wrong-type"),
    (icmpv6.parse_neighbor_solicitation, bytes([135, 1]) + bytes(22), "ndp-bad-code"),
    (icmpv6.parse_neighbor_advertisement, bytes([136, 0]) + bytes(10), "ndp-short"),
    (icmpv6.parse_router_solicitation, bytes([133, 0]) + bytes(4), "ndp-short"),
    (icmpv6.parse_router_advertisement, bytes([134, 0]) + bytes(12), "ndp-short"),
    (icmpv6.parse_neighbor_advertisement,
     bytes([136, 0]) + bytes(22) + b"\x02\x00" + bytes(6), "ndp-zero-length-option"),
])
def test_malformed_ndp_messages_raise(parser, message, reason):
    with pytest.raises(MalformedFrame) as info:
        parser(message)
    assert info.value.reason == reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([133, 134, 135, 136]))
def test_ndp_parsers_never_raise_anything_but_malformed_frame(body, kind):
    message = bytes([kind, 0, 0, 0]) + body
    parser = {133: icmpv6.parse_router_solicitation, 134: icmpv6.parse_router_advertisement,
              135: icmpv6.parse_neighbor_solicitation,
              136: icmpv6.parse_neighbor_advertisement}[kind]
    try:
        parser(message)
    except MalformedFrame:
        pass


def test_options_builders_refuse_what_does_not_fit():
    with pytest.raises(ValueError):
        icmpv6.dnssl_option(1, ["a" * 63 + "." + "b" * 63] * 20)
    with pytest.raises(ValueError):
        icmpv6.rdnss_option(1, ())
    with pytest.raises(ValueError):
        icmpv6.dnssl_option(1, ())


def test_dns_names_round_trip_and_match_dpkt_dns_encoding():
    names = ["example.internal", "a.b.c", "xn--bcher-kva.example"]
    wire = dnsname.encode_list(names)
    assert dnsname.decode_list(wire) == names
    assert dnsname.decode_list(wire + bytes(3), padded=True) == names
    # dpkt's DNS packer writes a first name in the same uncompressed form.
    assert dpkt.dns.pack_name("example.internal", 0, {}) == dnsname.encode("example.internal")
    with pytest.raises(ValueError):
        dnsname.encode("a..b")
    with pytest.raises(MalformedFrame):
        dnsname.decode_list(b"\x00")          # an empty name where one is due
    with pytest.raises(MalformedFrame):
        dnsname.decode_list(b"\x03abc")       # no root label


def test_ethernet_knows_the_ipv6_ethertype():
    assert ethernet.ETHERTYPE_IPV6 == 0x86DD


def test_parse_takes_a_memoryview_or_bytearray_like_bytes():
    hop = _ext(17, b"\x05\x02\x00\x00")
    raw = b"E" * 14 + _packet(GUEST, GATEWAY, 0, hop + bytes(12))
    for frame in (memoryview(raw), bytearray(raw)):
        h = ipv6.parse(frame, 14)
        assert (h.src, h.dst, h.protocol, h.payload_offset) == (GUEST, GATEWAY, 17, 14 + 48)
        assert isinstance(h.src, bytes)
