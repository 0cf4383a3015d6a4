"""ICMP echo NAT: identifier rewriting, raw-socket parsing and the handler
with fake backends, for both families (tests/guest/test_icmp_nat.py has the
real guests). "Remote" hosts are reached only through ``--map`` onto
loopback, under ``--deny 0.0.0.0/0 --allow 127.0.0.0/8 --deny ::/0 --allow ::1/128``.
"""

import ipaddress


import struct

import dpkt
import framebuild as fb
from framebuild import FakeLink
from twisted.internet.task import Clock

from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.policy import Egress
from arcbox_net.protocols import icmp_nat
from arcbox_net.protocols.icmp import IcmpHandler
from arcbox_net.protocols.icmp_nat import (
    IcmpNat,
    RawBackend,
    echo_fields,
    guest_reply,
    host_request,
    icmp6_filter,
    parse_raw6_message,
    parse_raw_packet,
    with_ident,
)
from arcbox_net.protocols.icmpv6 import Icmpv6Handler
from arcbox_net.protocols.ndp import NdpHandler
from arcbox_net.wire import icmpv6
from arcbox_net.wire.checksum import ones_sum


def echo(mtype, ident, seq, payload):
    return bytes(dpkt.icmp.ICMP(type=mtype, code=0,
                                data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload)))


def ip_packet(src, dst, payload, ttl=64, proto=1):
    pkt = dpkt.ip.IP(src=fb.ip4(src), dst=fb.ip4(dst), p=proto, ttl=ttl, data=payload)
    pkt.len = len(pkt)
    return bytes(pkt)


def test_with_ident_keeps_sequence_and_payload_and_fixes_the_checksum():
    request = echo(8, 0x1234, 77, b"payload bytes" * 10)
    out = with_ident(request, 0xBEEF)
    assert echo_fields(out) == (8, 0, 0xBEEF, 77)
    assert out[8:] == request[8:]
    assert ones_sum(out) == 0xFFFF
    back = with_ident(out, 0x1234)
    assert back == request
    odd = echo(0, 1, 65535, b"odd")
    assert ones_sum(with_ident(odd, 65535)) == 0xFFFF


def test_parse_raw_echo_reply():
    reply = echo(0, 4242, 3, b"abc")
    parsed = parse_raw_packet(ip_packet("127.0.0.2", "127.0.0.1", reply, ttl=61))
    assert parsed == ("reply", fb.ip4("127.0.0.2"), 4242, 61, reply)
    broken = bytearray(reply)
    broken[-1] ^= 1
    assert parse_raw_packet(ip_packet("127.0.0.2", "127.0.0.1", bytes(broken))) is None
    assert parse_raw_packet(ip_packet("127.0.0.2", "127.0.0.1", echo(8, 1, 1, b""))) is None
    assert parse_raw_packet(b"\x45" + b"\0" * 10) is None


def test_parse_raw_error_quoting_our_echo_request():
    ours = ip_packet("127.0.0.1", "127.0.0.9", echo(8, 4242, 3, b"abcdefgh"))
    error = bytes(dpkt.icmp.ICMP(type=3, code=1, data=dpkt.icmp.ICMP.Unreach(data=ours[:28])))
    parsed = parse_raw_packet(ip_packet("127.0.0.5", "127.0.0.1", error))
    assert parsed == ("error", 3, 1, fb.ip4("127.0.0.9"), 4242, 0)
    udp_quote = ip_packet("127.0.0.1", "127.0.0.9", b"\0" * 8, proto=17)
    error = bytes(dpkt.icmp.ICMP(type=3, code=3, data=dpkt.icmp.ICMP.Unreach(data=udp_quote)))
    assert parse_raw_packet(ip_packet("127.0.0.9", "127.0.0.1", error)) is None


class FakeBackend:
    name = "fake"

    def __init__(self):
        self.sent = []
        self.closed = []
        self.stopped = False
        self.next_id = 900

    def open(self, flow):
        self.next_id += 1
        flow.host_id = self.next_id

    def send(self, flow, message):
        self.sent.append((flow, message))

    def close(self, flow):
        self.closed.append(flow)

    def stop(self):
        self.stopped = True


class FakeRawSocket:
    def __init__(self):
        self.sent = []
        self.closed = False

    def sendto(self, message, host):
        self.sent.append((message, host))

    def close(self):
        self.closed = True


class Harness:
    def __init__(self, backend=None, **overrides):
        settings = dict(address_map=["203.0.113.10=127.0.0.2", "203.0.113.20=127.0.0.3"],
                        deny=["0.0.0.0/0", "127.0.0.3/32"], allow=["127.0.0.0/8"])
        settings.update(overrides)
        config = StackConfig(**settings)
        self.link = FakeLink()
        self.dispatcher = FrameDispatcher(config, self.link)
        self.dispatcher.guest_mac = fb.GUEST_MAC
        self.clock = Clock()
        self.nat = IcmpNat(self.dispatcher, config, Egress(config), self.clock,
                           mode=backend or FakeBackend())
        self.icmp = IcmpHandler(self.dispatcher, forward=self.nat)
        self.dispatcher.register(self.icmp)
        self.icmp.start()
        self.backend = self.nat.backend

    def ping(self, dst, ident=7, seq=1, payload=b"ping"):
        frame = fb.echo_request(dst=dst, ident=ident, seq=seq, payload=payload)
        self.dispatcher.frames_received([frame])
        return frame


def test_echo_to_a_mapped_address_goes_to_its_host_and_the_reply_back():
    h = Harness()
    h.ping("203.0.113.10", ident=7, seq=5, payload=b"hello")
    [(flow, message)] = h.backend.sent
    assert flow.host == "127.0.0.2" and echo_fields(message) == (8, 0, 7, 5)
    # The host's reply carries the host identifier and its own TTL.
    h.nat.host_reply(flow, with_ident(echo(0, 7, 5, b"hello"), flow.host_id), ttl=57)
    [frame] = h.link.take()
    ip = frame.data
    assert ip.src == fb.ip4("203.0.113.10") and ip.dst == fb.ip4(fb.GUEST_IP) and ip.ttl == 57
    assert (ip.data.type, ip.data.data.id, ip.data.data.seq, ip.data.data.data) == \
        (0, 7, 5, b"hello")
    assert ones_sum(bytes(ip.data)) == 0xFFFF
    [listing] = h.nat.flows()
    assert listing["remote"] == "203.0.113.10" and listing["host"] == "127.0.0.2 id 901"


def test_the_gateway_is_still_answered_locally():
    h = Harness()
    h.ping(fb.GATEWAY_IP)
    assert h.backend.sent == []
    [frame] = h.link.take()
    assert frame.data.src == fb.ip4(fb.GATEWAY_IP) and frame.data.data.type == 0


def test_a_denied_target_never_gets_an_echo_reply():
    h = Harness()
    sent = h.ping("203.0.113.20")
    h.ping("192.0.2.1")                    # outside --allow
    assert h.backend.sent == []
    frames = h.link.take()
    assert [(f.data.data.type, f.data.data.code) for f in frames] == [(3, 13), (3, 13)]
    assert frames[0].data.src == fb.ip4("203.0.113.20")
    assert bytes(frames[0].data.data)[8:] == sent[14:14 + 28]
    assert h.nat.drops["icmp-denied"] == 2


def test_one_flow_per_guest_identifier_and_target():
    h = Harness()
    for seq in range(3):
        h.ping("203.0.113.10", ident=7, seq=seq)
    h.ping("203.0.113.10", ident=8)
    h.ping(fb.GATEWAY_IP, ident=7)                          # local: no flow
    flows = {id(f) for f, _m in h.backend.sent}
    assert len(flows) == 2 and len(h.nat.table) == 2


def test_only_echo_requests_are_forwarded():
    h = Harness()
    unreach = dpkt.icmp.ICMP(type=3, code=3, data=dpkt.icmp.ICMP.Unreach(data=b"\0" * 28))
    h.dispatcher.frames_received([fb.ethernet(fb.ipv4(unreach, 1, dst="203.0.113.10"))])
    assert h.backend.sent == [] and h.nat.drops["icmp-nat-not-echo-request"] == 1


def test_host_errors_reach_the_guest_quoting_its_request():
    h = Harness()
    sent = h.ping("203.0.113.10", ident=7, seq=9)
    [(flow, _m)] = h.backend.sent
    h.nat.host_error(flow, 3, 1)
    [frame] = h.link.take()
    assert frame.data.src == fb.ip4("203.0.113.10")
    assert (frame.data.data.type, frame.data.data.code) == (3, 1)
    assert bytes(frame.data.data)[8:] == sent[14:14 + 28]


def test_echo_flows_expire():
    h = Harness()
    h.ping("203.0.113.10")
    [(flow, _m)] = h.backend.sent
    h.clock.advance(29)
    assert len(h.nat.table) == 1
    h.clock.advance(1)
    assert len(h.nat.table) == 0 and h.backend.closed == [flow]
    assert h.clock.getDelayedCalls() == []
    h.nat.host_reply(flow, echo(0, flow.host_id, 1, b"ping"), 64)   # too late: dropped
    assert h.link.take() == []


def test_stop_closes_flows_and_the_backend():
    h = Harness()
    h.ping("203.0.113.10")
    backend = h.backend
    h.icmp.stop()
    assert backend.stopped and len(backend.closed) == 1 and h.clock.getDelayedCalls() == []


def test_without_a_backend_echo_is_dropped_and_counted():
    h = Harness()
    h.nat.backend = None
    h.ping("203.0.113.10")
    assert h.link.take() == [] and h.nat.drops["icmp-nat-unavailable"] == 1


def test_raw_backend_rewrites_identifiers_both_ways():
    sock = FakeRawSocket()
    h = Harness()
    h.nat.backend = raw = RawBackend(h.nat, sock=sock)
    h.ping("203.0.113.10", ident=7, seq=1, payload=b"abc")
    h.ping("203.0.113.10", ident=7, seq=2, payload=b"abc")
    [(m1, host), (m2, _h)] = sock.sent
    flow = h.nat.table.get((fb.ip4(fb.GUEST_IP), 7, fb.ip4("203.0.113.10")))
    assert host == "127.0.0.2" and raw.by_ident[flow.host_id] is flow
    assert echo_fields(m1) == (8, 0, flow.host_id, 1) and echo_fields(m2)[3] == 2
    assert ones_sum(m1) == 0xFFFF and m1[8:] == b"abc"
    # A reply from the right host with our identifier reaches the guest...
    raw.packet_received(ip_packet("127.0.0.2", "127.0.0.1", echo(0, flow.host_id, 1, b"abc"),
                                  ttl=64))
    # ...one from another host, or with another identifier, does not.
    raw.packet_received(ip_packet("127.0.0.5", "127.0.0.1", echo(0, flow.host_id, 2, b"abc")))
    raw.packet_received(ip_packet("127.0.0.2", "127.0.0.1",
                                  echo(0, (flow.host_id + 1) % 65536, 2, b"abc")))
    [frame] = h.link.take()
    assert frame.data.src == fb.ip4("203.0.113.10") and frame.data.ttl == 64
    assert (frame.data.data.data.id, frame.data.data.data.seq) == (7, 1)
    # An error about one of our requests becomes the guest's error.
    quoted = ip_packet("127.0.0.1", "127.0.0.2", m2)[:28]
    error = bytes(dpkt.icmp.ICMP(type=11, code=0, data=dpkt.icmp.ICMP.TimeExceed(data=quoted)))
    raw.packet_received(ip_packet("127.0.0.9", "127.0.0.1", error))
    [frame] = h.link.take()
    assert (frame.data.data.type, frame.data.src) == (11, fb.ip4("203.0.113.10"))
    h.nat.stop()
    assert sock.closed and raw.by_ident == {}


def test_raw_backend_identifiers_are_unique():
    h = Harness()
    raw = RawBackend(h.nat, sock=FakeRawSocket())
    flows = [icmp_nat.EchoFlow((b"\0" * 4, i, b"\1" * 4), "127.0.0.2") for i in range(2000)]
    for flow in flows:
        raw.open(flow)
    assert len({f.host_id for f in flows}) == 2000
    assert all(1 <= f.host_id <= 65535 for f in flows)


# -- IPv6

GUEST6 = "fd00::2"
SAFE6 = dict(deny=["0.0.0.0/0", "::/0"], allow=["127.0.0.0/8", "::1/128"])


def a6(text):
    return ipaddress.IPv6Address(text).packed


def echo6(mtype, ident, seq, payload, src=GUEST6, dst="2001:db8::10"):
    """An ICMPv6 echo message with its checksum (dpkt sums it inside an IP6)."""
    message = dpkt.icmp6.ICMP6(type=mtype, code=0,
                               data=dpkt.icmp6.ICMP6.Echo(id=ident, seq=seq, data=payload))
    packet = dpkt.ip6.IP6(src=a6(src), dst=a6(dst), nxt=58, hlim=64, data=message)
    packet.plen = len(message)
    return packet


class Harness6:
    """An IPv6 guest (fd00::2, its MAC known) behind Icmpv6Handler -> IcmpNat."""

    def __init__(self, backend=None, **overrides):
        settings = dict(address_map=["2001:db8::10=::1", "2001:db8::20=::2"], **SAFE6)
        settings.update(overrides)
        config = StackConfig(**settings)
        self.link = FakeLink()
        self.dispatcher = FrameDispatcher(config, self.link)
        self.dispatcher.framer.learn(a6(GUEST6), fb.GUEST_MAC)
        self.clock = Clock()
        self.nat = IcmpNat(self.dispatcher, config, Egress(config, ipv6_loopback=True),
                           self.clock, mode=backend or FakeBackend())
        self.icmp6 = Icmpv6Handler(self.dispatcher, NdpHandler(self.dispatcher, config,
                                                               self.clock), forward=self.nat)
        self.dispatcher.register(self.icmp6)
        self.nat.start()
        self.backend = self.nat.backend6

    def ping(self, dst, ident=7, seq=1, payload=b"ping", corrupt=False):
        packet = echo6(128, ident, seq, payload, dst=dst)
        raw = bytearray(bytes(packet))
        if corrupt:
            raw[-1] ^= 0xFF
        frame = fb.ethernet(bytes(raw), 0x86DD)
        self.dispatcher.frames_received([frame])
        return frame


def test_host_request_and_guest_reply_retype_between_families():
    v4 = echo(8, 0x1234, 9, b"data")
    as6 = host_request(v4, v6=True, ident=0x4321)
    # ICMPv6 request, checksum left to the kernel, identifier replaced.
    assert as6 == bytes((128, 0, 0, 0)) + b"\x43\x21\x00\x09data"
    assert host_request(as6, v6=False) == with_ident(v4, 0x4321)
    reply6 = guest_reply(bytes(echo6(129, 77, 9, b"data").data), 0x1234, a6("2001:db8::10"),
                         a6(GUEST6))
    assert icmpv6.verify(a6("2001:db8::10"), a6(GUEST6), reply6)
    assert reply6[0] == 129 and reply6[4:] == b"\x12\x34\x00\x09data"
    assert guest_reply(echo(0, 1, 9, b"data"), 0x1234, b"\1" * 4, b"\2" * 4) == \
        echo(0, 0x1234, 9, b"data")


def test_parse_raw6_reply_and_errors_in_icmpv4_terms():
    reply = bytes(echo6(129, 4242, 3, b"abc", src="::1", dst="::1").data)
    assert parse_raw6_message(reply, a6("::1"), 61) == ("reply", a6("::1"), 4242, 61, reply)
    ours = bytes(echo6(128, 4242, 3, b"abcdefgh", src="::1", dst="2001:db8::77"))
    for (kind, code), (v4kind, v4code) in {(1, 4): (3, 3), (1, 1): (3, 13),
                                           (3, 0): (11, 0)}.items():
        error = bytes((kind, code, 0, 0, 0, 0, 0, 0)) + ours
        assert parse_raw6_message(error, a6("::1"), 64) == \
            ("error", v4kind, v4code, a6("2001:db8::77"), 4242, 0)
    too_big = bytes((2, 0, 0, 0)) + (1400).to_bytes(4, "big") + ours
    assert parse_raw6_message(too_big, a6("::1"), 64) == \
        ("error", 3, 4, a6("2001:db8::77"), 4242, 1400)
    # Not about an echo request of ours, short, or another type: ignored.
    udp_quote = bytearray(ours)
    udp_quote[6] = 17
    assert parse_raw6_message(bytes(8) + bytes(udp_quote), a6("::1"), 64) is None
    assert parse_raw6_message(bytes((1, 0, 0, 0, 0, 0, 0, 0)) + ours[:40], a6("::1"), 64) is None
    assert parse_raw6_message(bytes((135, 0, 0, 0)) * 8, a6("::1"), 64) is None
    assert parse_raw6_message(b"\x81\0", a6("::1"), 64) is None


def test_icmp6_filter_passes_only_the_named_types():
    words = struct.unpack("=8I", icmp6_filter((1, 129)))
    blocked = {t for t in range(256) if words[t >> 5] >> (t & 31) & 1}
    assert blocked == set(range(256)) - {1, 129}


def test_v6_echo_to_a_mapped_address_goes_to_its_host_and_the_real_reply_back():
    h = Harness6()
    h.ping("2001:db8::10", ident=7, seq=5, payload=b"hello")
    [(flow, message)] = h.backend.sent
    assert flow.host == "::1" and flow.host_v6 and echo_fields(message) == (128, 0, 7, 5)
    assert h.link.take() == []                 # nothing made up meanwhile
    # The host's reply carries the kernel's identifier and its own hop limit.
    h.nat.host_reply(flow, bytes(echo6(129, flow.host_id, 5, b"hello", src="::1",
                                       dst="::1").data), ttl=57)
    [frame] = h.link.take()
    ip = frame.data
    assert frame.type == 0x86DD and frame.dst == fb.GUEST_MAC
    assert (ip.src, ip.dst, ip.hlim) == (a6("2001:db8::10"), a6(GUEST6), 57)
    message = bytes(ip.data)
    assert echo_fields(message) == (129, 0, 7, 5) and message[8:] == b"hello"
    assert icmpv6.verify(ip.src, ip.dst, message)
    # An ICMPv4 echo reply is no answer to an IPv6 host's flow.
    h.nat.host_reply(flow, echo(0, flow.host_id, 5, b"hello"), ttl=57)
    assert h.link.take() == []
    [listing] = h.nat.flows()
    assert listing["protocol"] == "icmp" and listing["guest"] == "fd00::2 id 7"
    assert listing["remote"] == "2001:db8::10" and listing["host"] == "::1 id 901"
    assert listing["state"] == "answered"


def test_v6_guest_to_a_v4_host_is_retyped_both_ways():
    h = Harness6()
    # --map refuses to mix families; the egress table itself can.
    h.nat.egress.mapping[a6("2001:db8::11")] = ipaddress.IPv4Address("127.0.0.2")
    h.ping("2001:db8::11", ident=3, seq=2, payload=b"xy")
    [(flow, _message)] = h.backend.sent
    assert flow.host == "127.0.0.2" and not flow.host_v6
    h.nat.host_reply(flow, with_ident(echo(0, 3, 2, b"xy"), 999), ttl=64)
    [frame] = h.link.take()
    assert frame.type == 0x86DD and echo_fields(bytes(frame.data.data)) == (129, 0, 3, 2)


def test_v6_gateway_echo_is_answered_by_the_stack_not_the_nat():
    h = Harness6()
    h.ping("fd00::1")
    assert h.backend.sent == []
    [frame] = h.link.take()
    assert frame.data.src == a6("fd00::1") and frame.data.data.type == 129


def test_v6_denied_and_martian_targets_get_icmpv6_errors_never_a_reply():
    h = Harness6()
    sent = h.ping("2001:db8::99")       # not mapped: the policy denies it
    h.ping("2001:db8::20")              # mapped to ::2: outside --allow
    h.ping("fd00::5")                   # a neighbour guest: no route to the host
    assert h.backend.sent == []
    frames = h.link.take()
    assert [(f.data.data.type, f.data.data.code) for f in frames] == [(1, 1), (1, 1), (1, 0)]
    first = frames[0].data
    assert first.src == a6("2001:db8::99") and first.dst == a6(GUEST6)
    assert icmpv6.verify(first.src, first.dst, bytes(first.data))
    assert bytes(first.data)[8:] == sent[14:]          # the whole request quoted
    assert h.nat.drops["icmp-denied"] == 2 and h.nat.drops["icmp-no-route"] == 1


def test_v6_bad_checksum_is_dropped_and_counted():
    h = Harness6()
    h.ping("2001:db8::10", corrupt=True)
    assert h.backend.sent == [] and h.link.take() == []
    assert h.nat.drops["icmp-nat-bad-checksum"] == 1


def test_v6_host_errors_become_icmpv6_errors_quoting_the_request():
    h = Harness6()
    sent = h.ping("2001:db8::10", ident=7, seq=9)
    [(flow, _m)] = h.backend.sent
    h.nat.host_error(flow, 3, 3)                        # port unreachable, v4 terms
    h.nat.host_error(flow, 11, 0)
    h.nat.host_error(flow, 3, 4, 1000)                  # too big: never below 1280
    frames = h.link.take()
    assert [(f.data.data.type, f.data.data.code) for f in frames] == [(1, 4), (3, 0), (2, 0)]
    assert all(f.data.src == a6("2001:db8::10") for f in frames)
    assert bytes(frames[0].data.data)[8:] == sent[14:]
    assert bytes(frames[2].data.data)[4:8] == (1280).to_bytes(4, "big")


def test_v6_flows_are_separate_from_v4_ones_and_expire():
    h = Harness6()
    h.ping("2001:db8::10", ident=7)
    h.ping("2001:db8::10", ident=7, seq=2)
    h.ping("2001:db8::10", ident=8)
    assert len(h.nat.table) == 2 and len({id(f) for f, _m in h.backend.sent}) == 2
    h.clock.advance(30)
    assert len(h.nat.table) == 0 and len(h.backend.closed) == 2


def test_v6_without_a_backend_is_dropped_and_counted():
    h = Harness6()
    h.nat.backend6 = None
    h.ping("2001:db8::10")
    assert h.link.take() == [] and h.nat.drops["icmp-nat-unavailable"] == 1


def test_raw6_backend_rewrites_identifiers_and_matches_replies_by_source():
    sock = FakeRawSocket()
    h = Harness6()
    h.nat.backend6 = raw = RawBackend(h.nat, sock=sock, v6=True)
    h.ping("2001:db8::10", ident=7, seq=1, payload=b"abc")
    [(m1, host)] = sock.sent
    flow = h.nat.table.get((a6(GUEST6), 7, a6("2001:db8::10")))
    assert host == "::1" and raw.by_ident[flow.host_id] is flow
    assert echo_fields(m1) == (128, 0, flow.host_id, 1) and m1[8:] == b"abc"
    reply = bytes(echo6(129, flow.host_id, 1, b"abc", src="::1", dst="::1").data)
    raw.message6_received(reply, a6("::2"), 64)          # another host: not ours
    raw.message6_received(reply, a6("::1"), 63)
    [frame] = h.link.take()
    assert frame.data.hlim == 63 and echo_fields(bytes(frame.data.data)) == (129, 0, 7, 1)
    quoted = bytes(echo6(128, flow.host_id, 1, b"abc", src="::1", dst="::1"))
    raw.message6_received(bytes((1, 3, 0, 0, 0, 0, 0, 0)) + quoted, a6("::1"), 64)
    [frame] = h.link.take()
    assert (frame.data.data.type, frame.data.data.code) == (1, 3)
    h.nat.stop()
    assert sock.closed and raw.by_ident == {}


def test_network_stack_gives_icmpv6_the_same_nat():
    from twisted.internet.testing import MemoryReactorClock

    from arcbox_net.stack import NetworkStack
    stack = NetworkStack(FakeLink(), StackConfig(**SAFE6), reactor=MemoryReactorClock())
    assert stack.icmp6.forward is stack.icmp.forward is not None
    off = NetworkStack(FakeLink(), StackConfig(ipv6=False), reactor=MemoryReactorClock())
    assert off.icmp6 is None


class UnroutableBackend(FakeBackend):
    """A ping socket whose connect fails: no route, or no descriptors left."""

    def __init__(self, errno_value):
        super().__init__()
        self.errno_value = errno_value

    def open(self, flow):
        raise OSError(self.errno_value, "fails")


def test_a_host_socket_without_a_route_answers_the_guest_at_once():
    import errno
    h6 = Harness6(backend=UnroutableBackend(errno.ENETUNREACH))
    h6.ping("2001:db8::10")
    [frame] = h6.link.take()
    assert (frame.data.data.type, frame.data.data.code) == (1, 0)
    assert frame.data.src == a6("2001:db8::10") and len(h6.nat.table) == 0
    h4 = Harness(backend=UnroutableBackend(errno.EHOSTUNREACH))
    h4.ping("203.0.113.10")
    [frame] = h4.link.take()
    assert (frame.data.data.type, frame.data.data.code) == (3, 1)
    assert h4.nat.drops["icmp-host-unreachable"] == 1
    # Out of descriptors is no answer a router gives: counted, not told.
    h = Harness6(backend=UnroutableBackend(errno.EMFILE))
    h.ping("2001:db8::10")
    assert h.link.take() == [] and h.nat.drops["icmp-socket-failed"] == 1


def test_a_host_without_ipv6_gets_one_warning_and_no_v6_backend(monkeypatch):
    import errno
    import socket as socket_module

    from twisted.logger import globalLogPublisher
    real_socket = socket_module.socket

    def no_ipv6(family=socket_module.AF_INET, *args, **kwargs):
        if family == socket_module.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)
    monkeypatch.setattr(icmp_nat.socket, "socket", no_ipv6)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        nat = IcmpNat(FrameDispatcher(StackConfig(), FakeLink()), StackConfig(),
                      Egress(StackConfig(), ipv6_loopback=False), Clock(), mode="ping")
        nat.backend = FakeBackend()       # the IPv4 side is not what is tested here
        nat.start()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert nat.backend6 is None
    lines = [e["log_format"] for e in events if e.get("log_namespace", "").endswith("IcmpNat")]
    assert len(lines) == 1 and "the host has no {family}" in lines[0]
