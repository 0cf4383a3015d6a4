"""The NDP responder and router advertiser: what a guest's kernel sends
(NS for the gateway, DAD probes, RS at boot), what it must get back, every
validation of RFC 4861 6.1/7.1, and the RA schedule on a fake clock."""

import ipaddress
import random
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcbox_net.protocols import ndp
from arcbox_net.wire import icmpv6, ipv6

GW_MAC = bytes.fromhex("02abcb000001")
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_LL = ipv6.link_local_from_mac(GUEST_MAC)
GUEST = ipaddress.IPv6Address("fd00::2").packed
GATEWAY = ipaddress.IPv6Address("fd00::1").packed
ROUTER = ipaddress.IPv6Address("fe80::1").packed


def _deliver(responder, src, dst, message, hop_limit=255, src_mac=GUEST_MAC, now=0.0):
    """The packet as the dispatcher will hand it over: parsed header, ICMPv6 bytes."""
    raw = ipv6.build_header(src, dst, 58, len(message), ttl=hop_limit) + message
    ip = ipv6.parse(raw, 0)
    return responder.handle(ip, ip.payload(raw), src_mac, now)


def _stack(now=0.0, learn=None, **kwargs):
    advertiser = ndp.RouterAdvertiser(GW_MAC, now, rng=random.Random(1), **kwargs)
    return ndp.NdpResponder(GW_MAC, advertiser, learn=learn)


def _dpkt_ns(src, dst, target, mac=None):
    """An NS built by dpkt (checksum from dpkt's pseudo-header), not by us."""
    body = bytes(4) + target + ((b"\x01\x01" + mac) if mac else b"")
    packet = dpkt.ip6.IP6(src=src, dst=dst, nxt=58, hlim=255,
                          data=dpkt.icmp6.ICMP6(type=135, code=0, data=body))
    packet.plen = len(packet.data)
    raw = bytes(packet)
    return raw[40:]


@pytest.mark.parametrize("target", [GATEWAY, ROUTER])
def test_ns_for_an_owned_address_gets_a_solicited_router_na(target):
    responder = _stack()
    ns = _dpkt_ns(GUEST_LL, ipv6.solicited_node(target), target, GUEST_MAC)
    [reply] = _deliver(responder, GUEST_LL, ipv6.solicited_node(target), ns)
    assert (reply.dst_mac, reply.src_ip, reply.dst_ip, reply.hop_limit) == \
        (GUEST_MAC, target, GUEST_LL, 255)
    assert icmpv6.verify(reply.src_ip, reply.dst_ip, reply.message)
    na = icmpv6.parse_neighbor_advertisement(reply.message)
    assert na == icmpv6.NeighborAdvertisement(target, True, True, True, GW_MAC)
    assert responder.replies == 1


def test_unicast_ns_without_a_source_option_answers_the_frame_source():
    responder = _stack()
    ns = icmpv6.neighbor_solicitation(GUEST, GATEWAY, GATEWAY)   # NUD: unicast, no option
    [reply] = _deliver(responder, GUEST, GATEWAY, ns, src_mac=GUEST_MAC)
    assert reply.dst_mac == GUEST_MAC and reply.dst_ip == GUEST


def test_dad_probe_for_our_address_is_defended_to_all_nodes():
    responder = _stack()
    dst = ipv6.solicited_node(GATEWAY)
    [reply] = _deliver(responder, bytes(16), dst, icmpv6.neighbor_solicitation(bytes(16), dst,
                                                                               GATEWAY))
    assert (reply.dst_mac, reply.dst_ip) == (bytes.fromhex("333300000001"), ipv6.ALL_NODES)
    na = icmpv6.parse_neighbor_advertisement(reply.message)
    assert na.target == GATEWAY and not na.solicited and na.override and na.router


def test_dad_for_the_guests_own_address_is_left_alone():
    responder = _stack()
    dst = ipv6.solicited_node(GUEST)
    assert _deliver(responder, bytes(16), dst,
                    icmpv6.neighbor_solicitation(bytes(16), dst, GUEST)) == []
    assert responder.drops["ndp-not-ours"] == 1


def _ns(target=GATEWAY, src=GUEST_LL, mac=GUEST_MAC):
    return icmpv6.neighbor_solicitation(src, ipv6.solicited_node(target), target, mac)


@pytest.mark.parametrize("case, reason", [
    ({"hop_limit": 64}, "ndp-bad-hop-limit"),
    ({"src": ipv6.ALL_NODES}, "ndp-multicast-source"),
    ({"corrupt": True}, "ndp-bad-checksum"),
    ({"code": 1}, "ndp-bad-code"),
    ({"message": _ns()[:20]}, "ndp-malformed"),
    ({"target": ipv6.ALL_NODES}, "ndp-multicast-target"),
    ({"src": bytes(16)}, "ndp-bad-dad"),                 # DAD probe with a source option
    ({"dst": GATEWAY, "src": bytes(16), "mac": None}, "ndp-bad-dad"),   # DAD not to the group
    ({"options": b"\x01\x00" + bytes(6)}, "ndp-zero-length-option"),
    ({"options": b"\x0e\x02" + bytes(6)}, "ndp-truncated-option"),
    ({"message": bytes([1, 0, 0, 0]) + bytes(4)}, "ndp-not-ndp"),
    ({"message": bytes(4)}, "ndp-malformed"),
])
def test_invalid_solicitations_are_counted_not_answered(case, reason):
    responder = _stack()
    src = case.get("src", GUEST_LL)
    target = case.get("target", GATEWAY)
    dst = case.get("dst", ipv6.solicited_node(target))
    mac = case.get("mac", GUEST_MAC)
    message = case.get("message")
    if message is None:
        raw = icmpv6.neighbor_solicitation(src, dst, target, mac) + case.get("options", b"")
        raw = bytearray(raw)
        raw[1] = case.get("code", 0)
        message = icmpv6.build(src, dst, raw[0], raw[1], raw[4:8], raw[8:])
        if case.get("corrupt"):
            message = message[:-1] + bytes([message[-1] ^ 1])
    elif len(message) >= 8:
        message = icmpv6.build(src, dst, message[0], message[1], message[4:8], message[8:])
    assert _deliver(responder, src, dst, message, hop_limit=case.get("hop_limit", 255)) == []
    assert responder.drops[reason] == 1, responder.drops


def test_learn_is_told_announced_addresses_and_spoofs_are_counted():
    told = []
    responder = _stack(learn=lambda address, mac: told.append((address, mac)) or True)
    _deliver(responder, GUEST_LL, ipv6.solicited_node(GATEWAY), _ns())
    na = icmpv6.neighbor_advertisement(GUEST, ipv6.ALL_NODES, GUEST, GUEST_MAC)
    assert _deliver(responder, GUEST, ipv6.ALL_NODES, na) == []
    assert told == [(GUEST_LL, GUEST_MAC), (GUEST, GUEST_MAC)]
    other = bytes.fromhex("525400999999")
    _deliver(responder, GUEST_LL, ipv6.solicited_node(GATEWAY), _ns(mac=other))
    assert responder.drops["ndp-spoofed-sender"] == 1 and len(told) == 2


def test_na_claiming_our_address_or_solicited_to_multicast_is_counted():
    responder = _stack()
    conflict = icmpv6.neighbor_advertisement(GUEST, ipv6.ALL_NODES, GATEWAY, GUEST_MAC)
    _deliver(responder, GUEST, ipv6.ALL_NODES, conflict)
    bad = icmpv6.neighbor_advertisement(GUEST, ipv6.ALL_NODES, GUEST, GUEST_MAC, solicited=True)
    _deliver(responder, GUEST, ipv6.ALL_NODES, bad)
    assert responder.drops["ndp-address-conflict"] == 1 and responder.drops["ndp-bad-na"] == 1


def test_an_ra_from_the_guest_is_ignored():
    responder = _stack()
    ra = icmpv6.router_advertisement(GUEST_LL, ipv6.ALL_NODES, router_lifetime=9000)
    assert _deliver(responder, GUEST_LL, ipv6.ALL_NODES, ra) == []
    assert responder.drops["ndp-guest-router"] == 1


# -- router advertisements -------------------------------------------------

def _ra_of(reply):
    assert icmpv6.verify(reply.src_ip, reply.dst_ip, reply.message)
    assert reply.src_ip == ROUTER and reply.hop_limit == 255
    return icmpv6.parse_router_advertisement(reply.message)


def test_rs_gets_an_ra_at_once_with_the_issue_16_content():
    responder = _stack(search=ndp.search_list("example.internal", ()), mtu=1400)
    rs = icmpv6.router_solicitation(GUEST_LL, ipv6.ALL_ROUTERS, GUEST_MAC)
    [reply] = _deliver(responder, GUEST_LL, ipv6.ALL_ROUTERS, rs, now=5.0)
    assert (reply.dst_mac, reply.dst_ip) == (GUEST_MAC, GUEST_LL)
    ra = _ra_of(reply)
    assert (ra.managed, ra.other, ra.router_lifetime, ra.hop_limit) == (True, True, 1800, 64)
    assert (ra.source_mac, ra.mtu) == (GW_MAC, 1400)
    [prefix] = ra.prefixes
    assert (ipaddress.IPv6Address(prefix.prefix), prefix.prefix_len) == \
        (ipaddress.IPv6Address("fd00::"), 64)
    assert prefix.on_link and prefix.autonomous
    assert prefix.valid_lifetime == 2592000 and prefix.preferred_lifetime == 604800
    assert ra.rdnss == ((1800, (GATEWAY,)),)
    assert ra.dnssl == ((1800, ("example.internal",)),)
    # dpkt reads the same message type and checksum.
    assert dpkt.icmp6.ICMP6(reply.message).type == 134


def test_ra_flags_and_dns_follow_the_constructor():
    adv = ndp.RouterAdvertiser(GW_MAC, 0.0, managed=False, other=False, dns=(), search=())
    ra = icmpv6.parse_router_advertisement(adv.advertisement(ipv6.ALL_NODES))
    assert (ra.managed, ra.other, ra.rdnss, ra.dnssl) == (False, False, (), ())
    assert ndp.search_list("d.example", ("a.example", "b.example")) == ("a.example", "b.example")
    assert ndp.search_list(None, ()) == ()


def test_constructor_refuses_bad_values():
    with pytest.raises(ValueError):
        ndp.RouterAdvertiser(GW_MAC, 0.0, link_local="fd00::1")
    with pytest.raises(ValueError):
        ndp.RouterAdvertiser(GW_MAC, 0.0, min_interval=500, max_interval=600)
    with pytest.raises(ValueError):
        ndp.RouterAdvertiser(GW_MAC, 0.0, search=("bad..name",))


def test_rs_from_one_guest_is_answered_once_per_min_delay():
    responder = _stack()
    rs = icmpv6.router_solicitation(GUEST_LL, ipv6.ALL_ROUTERS, GUEST_MAC)
    assert len(_deliver(responder, GUEST_LL, ipv6.ALL_ROUTERS, rs, now=10.0)) == 1
    assert _deliver(responder, GUEST_LL, ipv6.ALL_ROUTERS, rs, now=12.0) == []
    assert len(_deliver(responder, GUEST_LL, ipv6.ALL_ROUTERS, rs, now=13.0)) == 1
    assert responder.advertiser.drops["ndp-rs-rate-limited"] == 1


def test_the_solicitor_table_is_bounded():
    adv = ndp.RouterAdvertiser(GW_MAC, 0.0)
    for i in range(1000):
        src = b"\xfe\x80" + bytes(10) + i.to_bytes(4, "big")
        assert len(adv.solicited(src, GUEST_MAC, 1.0)) == 1
    assert len(adv._unicast) == ndp.SOLICITORS


def test_rs_from_the_unspecified_address_gets_the_multicast_ra_rate_limited():
    responder = _stack(now=0.0)
    responder.advertiser.poll(0.0)                     # the boot RA
    due = responder.advertiser.next_due
    rs = icmpv6.router_solicitation(bytes(16), ipv6.ALL_ROUTERS)
    assert _deliver(responder, bytes(16), ipv6.ALL_ROUTERS, rs, now=1.0) == []
    # Not dropped for good: the next multicast RA is brought forward to 3 s.
    assert responder.advertiser.next_due == min(due, 3.0)
    [reply] = responder.advertiser.poll(3.0)
    assert reply.dst_ip == ipv6.ALL_NODES and reply.dst_mac == bytes.fromhex("333300000001")
    [reply] = _deliver(responder, bytes(16), ipv6.ALL_ROUTERS, rs, now=100.0)
    assert reply.dst_ip == ipv6.ALL_NODES
    # RFC 4861 6.1.1: the unspecified source never carries a link-layer option.
    bad = icmpv6.router_solicitation(bytes(16), ipv6.ALL_ROUTERS, GUEST_MAC)
    assert _deliver(responder, bytes(16), ipv6.ALL_ROUTERS, bad, now=200.0) == []
    assert responder.drops["ndp-bad-rs"] == 1


def test_unsolicited_schedule_on_a_fake_clock():
    """First RA at once, the next few within 16 s, then MinRtrAdvInterval to
    MaxRtrAdvInterval apart; poll before the time sends nothing."""
    adv = ndp.RouterAdvertiser(GW_MAC, 1000.0, rng=random.Random(7))
    assert adv.next_due == 1000.0 and adv.poll(999.0) == []
    gaps = []
    for _ in range(40):
        due = adv.next_due
        assert adv.poll(due - 0.5) == []
        [reply] = adv.poll(due)
        assert reply.dst_ip == ipv6.ALL_NODES and _ra_of(reply).router_lifetime == 1800
        assert adv.poll(due) == []                           # one RA per due time
        gaps.append(adv.next_due - due)
    initial = gaps[:ndp.MAX_INITIAL_RTR_ADVERTISEMENTS]
    steady = gaps[ndp.MAX_INITIAL_RTR_ADVERTISEMENTS:]
    assert all(g <= ndp.MAX_INITIAL_RTR_ADVERT_INTERVAL for g in initial)
    assert all(ndp.MIN_RTR_ADV_INTERVAL <= g <= ndp.MAX_RTR_ADV_INTERVAL for g in steady)
    assert len({round(g, 3) for g in steady}) > 10          # randomised, not a fixed period
    assert adv.sent == 40


def test_a_multicast_answer_resets_the_interval_timer():
    adv = ndp.RouterAdvertiser(GW_MAC, 0.0, rng=random.Random(3))
    for _ in range(5):
        adv.poll(adv.next_due)
    before = adv.next_due
    [_reply] = adv.solicited(bytes(16), None, before - 100.0)
    assert adv.next_due >= before - 100.0 + ndp.MIN_RTR_ADV_INTERVAL
    assert adv.last_multicast == before - 100.0


def test_final_advertisement_withdraws_the_default_route():
    adv = ndp.RouterAdvertiser(GW_MAC, 0.0)
    reply = adv.final()
    ra = _ra_of(reply)
    assert ra.router_lifetime == 0 and ra.prefixes and reply.dst_ip == ipv6.ALL_NODES
    assert struct.unpack_from("!H", reply.message, 6)[0] == 0


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([133, 134, 135, 136, 137]), st.integers(0, 2), st.binary(max_size=72),
       st.sampled_from([GUEST_LL, bytes(16), GUEST]))
def test_handle_never_raises_on_hostile_ndp(kind, code, body, src):
    responder = _stack()
    message = icmpv6.build(src, ipv6.ALL_ROUTERS, kind, code, body[:4].ljust(4, b"\0"), body[4:])
    for reply in _deliver(responder, src, ipv6.ALL_ROUTERS, message):
        assert icmpv6.verify(reply.src_ip, reply.dst_ip, reply.message)


def test_solicit_resolves_a_guest_address_from_the_same_scope():
    responder = _stack()
    ns = responder.solicit(GUEST)
    assert (ns.dst_mac, ns.dst_ip, ns.src_ip) == (
        bytes.fromhex("3333ff000002"), ipv6.solicited_node(GUEST), GATEWAY)
    assert icmpv6.verify(ns.src_ip, ns.dst_ip, ns.message)
    assert icmpv6.parse_neighbor_solicitation(ns.message) == \
        icmpv6.NeighborSolicitation(GUEST, GW_MAC)
    assert responder.solicit(GUEST_LL).src_ip == ROUTER
    # The guest's answer, as its kernel sends it, teaches the MAC.
    told = []
    responder.learn = lambda address, mac: told.append((address, mac)) or True
    na = icmpv6.neighbor_advertisement(GUEST, GATEWAY, GUEST, GUEST_MAC, solicited=True)
    assert _deliver(responder, GUEST, GATEWAY, na) == []
    assert told == [(GUEST, GUEST_MAC)]
