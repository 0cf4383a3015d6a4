"""Egress.route: host loopback only through its names, and closed when asked.

TCP, UDP and ICMP NAT all ask this one decision, so it is tested here for
each kind of destination, and through the UDP NAT for the counters."""

import ipaddress

import pytest

import framebuild as fb
from arcbox_net.config import StackConfig
from arcbox_net.policy import DENIED, LOOPBACK_CLOSED, MARTIAN, NO_ROUTE, Egress, Refusal

from .test_udp_nat import Harness

SAFE = dict(deny=["0.0.0.0/0"], allow=["127.0.0.0/8"],
            address_map=["203.0.113.10=127.0.0.2", "203.0.113.11=0.0.0.0"])


def egress(**kw):
    return Egress(StackConfig(**{**SAFE, **kw}))


@pytest.mark.parametrize("dst", ["127.0.0.1", "127.0.0.2", "127.255.255.254", "0.0.0.0",
                                 "0.1.2.3"])
@pytest.mark.parametrize("host_loopback", [True, False])
def test_a_guest_addressing_loopback_or_zero_directly_is_a_martian(dst, host_loopback):
    e = egress(host_loopback=host_loopback)
    for port in (0, 22, 53):
        assert e.route(fb.ip4(dst), port) is MARTIAN


def test_with_host_loopback_the_gateway_and_map_targets_reach_loopback():
    e = egress()
    assert e.route(fb.ip4("10.0.2.1"), 22) == ("127.0.0.1", 22)
    assert e.route(fb.ip4("203.0.113.10"), 7) == ("127.0.0.2", 7)


def test_without_host_loopback_nothing_reaches_host_loopback_mapped_or_direct():
    e = egress(host_loopback=False)
    assert e.route(fb.ip4("10.0.2.1"), 22) is NO_ROUTE
    assert e.route(fb.ip4("10.0.2.1")) is NO_ROUTE                  # ICMP
    assert e.route(fb.ip4("203.0.113.10"), 7) is LOOPBACK_CLOSED
    assert e.route(fb.ip4("203.0.113.11"), 7) is LOOPBACK_CLOSED    # 0.0.0.0 is loopback too
    assert e.route(fb.ip4("203.0.113.10")) is LOOPBACK_CLOSED
    for dst in ("127.0.0.1", "0.0.0.0"):
        assert isinstance(e.route(fb.ip4(dst), 80), Refusal)


def test_the_stacks_own_services_stay_reachable_without_host_loopback():
    e = egress(host_loopback=False)
    e.add_local_service(fb.ip4("10.0.2.1"), 53, "127.0.0.1", 5353)
    assert e.route(fb.ip4("10.0.2.1"), 53) == ("127.0.0.1", 5353)


def test_other_destinations_still_follow_the_policy():
    e = egress(host_loopback=False, allow=["127.0.0.0/8", "198.51.100.0/24"])
    assert e.route(fb.ip4("198.51.100.7"), 80) == ("198.51.100.7", 80)
    assert e.route(fb.ip4("192.0.2.1"), 80).reason == "denied"


def test_the_udp_nat_drops_and_counts_martians_and_opens_no_socket():
    h = Harness()
    for dst in ("127.0.0.1", "0.0.0.0"):
        h.guest_sends(5000, dst, 5353, b"q")
    assert h.sockets == []
    assert h.nat.drops["udp-martian"] == 2
    h = Harness(host_loopback=False)
    h.guest_sends(5000, "203.0.113.10", 7, b"q")
    assert h.sockets == [] and h.nat.drops["udp-loopback-closed"] == 1


def test_addresses_inside_the_guest_networks_never_lead_to_the_host():
    """The DNS address's other ports, a neighbour guest: no route (the
    gateway answers RST), not a host address of the same number."""
    config = StackConfig(dns="10.0.2.3", ipv6_dns="fd00::3")
    egress = Egress(config, ipv6_loopback=True)
    assert egress.route(ipaddress.IPv4Address("10.0.2.3").packed, 80) is NO_ROUTE
    assert egress.route(ipaddress.IPv4Address("10.0.2.77").packed, 80) is NO_ROUTE
    assert egress.route(ipaddress.IPv6Address("fd00::3").packed, 80) is NO_ROUTE
    assert egress.route(ipaddress.IPv6Address("fd00::1").packed, 80) == ("::1", 80)


def test_ipv6_destinations_mapped_denied_and_martian():
    config = StackConfig(address_map=["2001:db8::10=::1"], deny=["::/0"], allow=["::1/128"])
    egress = Egress(config, ipv6_loopback=True)
    v6 = lambda text: ipaddress.IPv6Address(text).packed  # noqa: E731
    assert egress.route(v6("2001:db8::10"), 443) == ("::1", 443)
    assert egress.route(v6("2001:db8::99"), 443) is DENIED
    for martian in ("::1", "::", "fe80::5", "ff02::1", "::ffff:127.0.0.1"):
        assert egress.route(v6(martian), 443) is MARTIAN, martian
    assert Egress(config, ipv6_loopback=False).route(v6("fd00::1"), 80) == ("127.0.0.1", 80)
