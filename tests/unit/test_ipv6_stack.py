"""The IPv6 wiring of the whole stack (dispatcher, framer, NDP, DHCPv6, the
NATs), driven frame by frame on a MemoryReactorClock: what a guest sends,
what leaves for it and what the host side is asked to do."""

import ipaddress

import pytest
from twisted.internet.testing import MemoryReactorClock

from framebuild import FakeLink, GATEWAY_MAC, GUEST_MAC
from arcbox_net.config import StackConfig
from arcbox_net.protocols import dhcpv6
from arcbox_net.stack import NetworkStack
from arcbox_net.wire import ethernet, icmpv6, ipv6, tcp, udp

GUEST_LL = ipv6.link_local_from_mac(GUEST_MAC)
GUEST6 = ipaddress.IPv6Address("fd00::2").packed
GW6 = ipaddress.IPv6Address("fd00::1").packed
ROUTER = ipaddress.IPv6Address("fe80::1").packed
SAFE = dict(deny=["0.0.0.0/0", "::/0"], allow=["127.0.0.0/8", "::1/128"],
            address_map=["2001:db8::10=::1"], dns_upstreams=["127.0.0.1:9"])


def v6(text):
    return ipaddress.IPv6Address(text).packed


def frame6(src, dst, nh, payload, hop_limit=64, dst_mac=GATEWAY_MAC, src_mac=GUEST_MAC):
    return ethernet.header(dst_mac, src_mac, ethernet.ETHERTYPE_IPV6) \
        + ipv6.build_header(src, dst, nh, len(payload), ttl=hop_limit) + payload


def udp6(src, dst, sport, dport, payload, **kw):
    return frame6(src, dst, 17, udp.build(src, dst, sport, dport, payload), **kw)


def tcp6(src, dst, sport, dport, flags, seq=1000, ack=0, options=b""):
    head, payload = tcp.build(src, dst, sport, dport, seq, ack, flags, 65535, options=options)
    return frame6(src, dst, 6, head + payload)


class Sent:
    """A frame the stack sent, as IPv6 header and upper-layer bytes."""

    def __init__(self, frame):
        self.dst_mac = frame[0:6]
        assert frame[12:14] == b"\x86\xdd", frame[:14].hex()
        self.ip = ipv6.parse(frame, 14)
        self.body = bytes(self.ip.payload(frame))


@pytest.fixture
def stack():
    reactor = MemoryReactorClock()
    s = NetworkStack(FakeLink(), StackConfig(**SAFE), reactor=reactor)
    s.egress.loopback6 = ipaddress.IPv6Address("::1")   # the host has ::1 (not probed here)
    return s


def receive(stack, *frames):
    stack.dispatcher.frames_received(list(frames))


def sent6(stack):
    out, stack.link.sent = stack.link.sent, []
    return [Sent(f) for f in out if f[12:14] == b"\x86\xdd"]


def test_a_router_solicitation_gets_an_advertisement_of_the_prefix(stack):
    rs = icmpv6.router_solicitation(GUEST_LL, ipv6.ALL_ROUTERS, GUEST_MAC)
    receive(stack, frame6(GUEST_LL, ipv6.ALL_ROUTERS, 58, rs, hop_limit=255,
                          dst_mac=ipv6.multicast_mac(ipv6.ALL_ROUTERS)))
    (ra,) = sent6(stack)
    assert ra.ip.src == ROUTER and ra.ip.dst == GUEST_LL and ra.ip.hop_limit == 255
    assert ra.dst_mac == GUEST_MAC
    parsed = icmpv6.parse_router_advertisement(ra.body)
    (prefix,) = parsed.prefixes
    assert prefix.prefix == v6("fd00::") and prefix.prefix_len == 64 and prefix.autonomous
    assert parsed.router_lifetime > 0 and parsed.mtu == 1500
    assert parsed.rdnss and GW6 in parsed.rdnss[0][1]


def test_the_gateway_answers_neighbour_solicitation_and_echo(stack):
    group = ipv6.solicited_node(GW6)
    ns = icmpv6.neighbor_solicitation(GUEST_LL, group, GW6, GUEST_MAC)
    receive(stack, frame6(GUEST_LL, group, 58, ns, hop_limit=255,
                          dst_mac=ipv6.multicast_mac(group)))
    (na,) = sent6(stack)
    parsed = icmpv6.parse_neighbor_advertisement(na.body)
    assert parsed.target == GW6 and parsed.target_mac == GATEWAY_MAC and parsed.solicited
    # The guest's link-local address was learned from the NS: echo goes back to it.
    receive(stack, frame6(GUEST_LL, GW6, 58, icmpv6.echo_request(GUEST_LL, GW6, 7, 1, b"hi")))
    (reply,) = sent6(stack)
    assert reply.body[0] == icmpv6.TYPE_ECHO_REPLY and reply.body.endswith(b"hi")
    assert icmpv6.verify(reply.ip.src, reply.ip.dst, reply.body)
    assert reply.ip.src == GW6 and reply.ip.dst == GUEST_LL and reply.dst_mac == GUEST_MAC


def test_dhcpv6_solicit_gets_an_advertise_of_the_first_address(stack):
    client = dhcpv6.duid_ll(GUEST_MAC)
    solicit = dhcpv6.message(dhcpv6.SOLICIT, 0x1234, [
        dhcpv6.option(dhcpv6.OPT_CLIENTID, client),
        dhcpv6.ia_na(1, 0, 0),
        dhcpv6.option(dhcpv6.OPT_ORO, b"\x00\x17")])
    receive(stack, udp6(GUEST_LL, ipv6.ALL_DHCP_SERVERS, 546, 547, solicit,
                        dst_mac=ipv6.multicast_mac(ipv6.ALL_DHCP_SERVERS)))
    (adv,) = sent6(stack)
    assert adv.ip.src == ROUTER and adv.ip.dst == GUEST_LL and adv.dst_mac == GUEST_MAC
    payload = adv.body[8:]
    assert payload[0] == dhcpv6.ADVERTISE
    assert v6("fd00::2") in payload and GW6 in payload   # the address, and DNS (option 23)


def test_tcp_over_ipv6_to_the_gateway_connects_to_host_loopback(stack):
    syn = tcp6(GUEST6, GW6, 40000, 8080, tcp.SYN, options=b"\x02\x04\x05\x8c")
    stack.dispatcher.framer.learn(GUEST6, GUEST_MAC)
    receive(stack, syn)
    host, port = stack.reactor.tcpClients[-1][:2]
    assert (host, port) == ("::1", 8080)
    assert sent6(stack) == []            # the SYN is held until the host answers
    conn = stack.tcp.connections[(GUEST6, 40000, GW6, 8080)].conn
    assert conn.params.mss_limit == 1500 - 60


def test_mapped_denied_and_guest_network_destinations(stack):
    stack.dispatcher.framer.learn(GUEST6, GUEST_MAC)
    receive(stack, tcp6(GUEST6, v6("2001:db8::10"), 40001, 443, tcp.SYN))
    assert stack.reactor.tcpClients[-1][:2] == ("::1", 443)
    # Denied (::/0): ICMPv6 administratively prohibited, at once.
    receive(stack, tcp6(GUEST6, v6("2001:db8::99"), 40002, 443, tcp.SYN))
    (err,) = sent6(stack)
    assert err.body[0] == icmpv6.TYPE_DEST_UNREACH and err.body[1] == icmpv6.CODE_ADMIN_PROHIBITED
    assert err.ip.src == v6("2001:db8::99") and err.ip.dst == GUEST6
    # fd00::3 is inside the guest's prefix: no route, the gateway resets.
    receive(stack, tcp6(GUEST6, v6("fd00::3"), 40003, 80, tcp.SYN))
    (rst,) = sent6(stack)
    assert rst.body[13] & tcp.RST
    assert len(stack.reactor.tcpClients) == 1


def test_a_v6_packet_for_an_unknown_guest_address_asks_by_neighbour_solicitation(stack):
    framer = stack.dispatcher.framer
    framer.send_udp(GW6, GUEST6, 53, 5353, b"answer")
    (ns,) = sent6(stack)
    assert ns.ip.dst == ipv6.solicited_node(GUEST6) and ns.ip.hop_limit == 255
    assert ns.body[0] == icmpv6.TYPE_NEIGHBOR_SOLICIT and ns.body[8:24] == GUEST6
    na = icmpv6.neighbor_advertisement(GUEST6, GW6, GUEST6, GUEST_MAC, solicited=True)
    receive(stack, frame6(GUEST6, GW6, 58, na, hop_limit=255))
    (held,) = sent6(stack)
    assert held.dst_mac == GUEST_MAC and held.body.endswith(b"answer")


def test_hostile_ipv6_frames_are_dropped_and_counted(stack):
    drops = stack.dispatcher.drops
    other_mac = b"\x02\x99\x00\x00\x00\x01"
    stack.dispatcher.framer.learn(GUEST6, GUEST_MAC)
    bad = [
        # another MAC claiming the guest's address
        udp6(GUEST6, GW6, 1, 53, b"x", src_mac=other_mac),
        # lying payload length
        frame6(GUEST6, GW6, 17, b"\0" * 8)[:-4],
        # a fragment
        frame6(GUEST6, GW6, 44, b"\x11\x00\x00\x01\x00\x00\x00\x01" + b"\0" * 16),
        # UDP to a multicast group that is not DHCPv6
        udp6(GUEST6, v6("ff02::fb"), 5353, 5353, b"mdns",
             dst_mac=ipv6.multicast_mac(v6("ff02::fb"))),
        # TCP from the unspecified address
        tcp6(bytes(16), GW6, 1, 80, tcp.SYN),
    ]
    receive(stack, *bad)
    assert sent6(stack) == []
    assert drops["spoofed-source"] == 2 and drops["truncated-ipv6"] == 1
    assert drops["ipv6-fragment"] == 1 and drops["multicast"] == 1
    assert sum(drops.values()) == len(bad)


def test_no_ipv6_drops_every_ipv6_frame():
    s = NetworkStack(FakeLink(), StackConfig(ipv6=False, **SAFE), reactor=MemoryReactorClock())
    rs = icmpv6.router_solicitation(GUEST_LL, ipv6.ALL_ROUTERS, GUEST_MAC)
    receive(s, frame6(GUEST_LL, ipv6.ALL_ROUTERS, 58, rs, hop_limit=255,
                      dst_mac=ipv6.multicast_mac(ipv6.ALL_ROUTERS)))
    assert s.link.sent == [] and s.dispatcher.drops["ipv6-disabled"] == 1
    assert s.icmp6 is None and s.dhcp6 is None


def test_only_dhcpv6_is_served_on_the_dhcp_servers_group(stack):
    """ff02::1:2 is DHCPv6's group: a DNS query sent there is not answered."""
    stack.dispatcher.framer.learn(GUEST_LL, GUEST_MAC)
    query = bytes.fromhex("12340100000100000000000004686f7374056172636278000001") + b"\x00\x01"
    receive(stack, udp6(GUEST_LL, ipv6.ALL_DHCP_SERVERS, 5353, 53, query,
                        dst_mac=ipv6.multicast_mac(ipv6.ALL_DHCP_SERVERS)))
    assert sent6(stack) == [] and stack.dispatcher.drops["multicast"] == 1
