"""Frame classification, drop counting and the ARP/ICMP cores (no reactor)."""

import random

import dpkt
import pytest
from zope.interface import implementer

from framebuild import FakeLink
import framebuild as fb
from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.interfaces import IFlushable, IIPv4Handler, IUDPService
from arcbox_net.protocols.arp import ArpHandler, ArpResponder
from arcbox_net.protocols.icmp import GatewayEcho, IcmpHandler


@pytest.fixture
def dispatcher():
    link = FakeLink()
    d = FrameDispatcher(StackConfig(), link)
    d.register(ArpHandler(d))
    d.register(IcmpHandler(d))
    return d


@implementer(IIPv4Handler, IFlushable)
class Recorder:
    def __init__(self, proto):
        self.ip_protocol = proto
        self.seen = []
        self.flushes = 0

    def handle_ipv4(self, frame, ip):
        self.seen.append((bytes(ip.src), bytes(ip.dst), ip.protocol))

    def flush(self):
        self.flushes += 1


@implementer(IUDPService)
class Service:
    udp_port = 53
    local_only = True

    def __init__(self):
        self.seen = []

    def handle_datagram(self, frame, ip, src_port, payload):
        self.seen.append((src_port, bytes(payload)))


def test_arp_request_for_gateway_is_answered_and_guest_mac_learned(dispatcher):
    dispatcher.frames_received([fb.arp_request()])
    assert dispatcher.guest_mac == fb.GUEST_MAC
    reply = fb.parse(dispatcher.link.sent[0])
    assert reply.dst == fb.GUEST_MAC and reply.src == fb.GATEWAY_MAC
    assert reply.data.op == dpkt.arp.ARP_OP_REPLY
    assert reply.data.sha == fb.GATEWAY_MAC and reply.data.spa == fb.ip4("10.0.2.1")
    assert reply.data.tha == fb.GUEST_MAC and reply.data.tpa == fb.ip4("10.0.2.2")


def test_arp_for_other_addresses_and_gratuitous_arp_are_not_answered(dispatcher):
    dispatcher.frames_received([fb.arp_request(target="10.0.2.77"),
                                fb.arp_request(target="10.0.2.2", sender="10.0.2.2")])
    assert dispatcher.link.sent == []


def test_gateway_echo_reply_keeps_id_seq_payload(dispatcher):
    dispatcher.frames_received([fb.echo_request(ident=99, seq=5, payload=b"abc" * 300)])
    reply = fb.parse(dispatcher.link.sent[0])
    assert reply.data.src == fb.ip4("10.0.2.1") and reply.data.dst == fb.ip4("10.0.2.2")
    icmp = reply.data.data
    assert icmp.type == 0 and icmp.data.id == 99 and icmp.data.seq == 5
    assert icmp.data.data == b"abc" * 300
    # dpkt recomputes checksums only when zero: verify both by hand.
    raw = bytes(reply.data)
    from arcbox_net.wire.checksum import ones_sum
    assert ones_sum(raw[:20]) == 0xFFFF and ones_sum(raw[20:]) == 0xFFFF


def test_echo_to_another_host_is_not_forged(dispatcher):
    dispatcher.frames_received([fb.echo_request(dst="192.0.2.9")])
    assert dispatcher.link.sent == []
    assert dispatcher.drops["icmp-no-route"] == 1


def test_dispatch_by_protocol_and_port_with_one_flush_per_batch(dispatcher):
    tcp = Recorder(6)
    udp = Recorder(17)
    dns = Service()
    for h in (tcp, udp, dns):
        dispatcher.register(h)
    dispatcher.frames_received([
        fb.tcp(1000, 80, dst="203.0.113.10"),
        fb.udp(5000, 53, b"q1"),                       # DNS to the gateway: the service
        fb.udp(5001, 53, b"q2", dst="203.0.113.10"),   # DNS elsewhere: plain UDP
        fb.udp(5002, 9999, b"x"),
    ])
    assert tcp.seen == [(fb.ip4("10.0.2.2"), fb.ip4("203.0.113.10"), 6)]
    assert dns.seen == [(5000, b"q1")]
    assert [s[1] for s in udp.seen] == [fb.ip4("203.0.113.10"), fb.ip4("10.0.2.1")]
    assert tcp.flushes == udp.flushes == 1


def test_register_rejects_objects_without_interfaces(dispatcher):
    with pytest.raises(TypeError):
        dispatcher.register(object())


@pytest.mark.parametrize("frame, reason", [
    (b"\x00" * 5, "short-ethernet"),
    (fb.GATEWAY_MAC + fb.GUEST_MAC + b"\x86\xdd" + b"\0" * 40, "bad-ip-version"),
    (fb.GATEWAY_MAC + fb.GUEST_MAC + b"\x88\xcc" + b"\0" * 40, "unknown-ethertype"),
    (b"\x02\x99\x99\x99\x99\x99" + fb.GUEST_MAC + b"\x08\x00" + b"\0" * 40, "not-for-gateway-mac"),
    (b"\x33\x33\x00\x00\x00\x01" + fb.GUEST_MAC + b"\x08\x00" + b"\0" * 40, "multicast"),
    (b"\x01\x00\x5e\x00\x00\x01" + fb.GUEST_MAC + b"\x86\xdd" + b"\0" * 40, "multicast"),
    (fb.GATEWAY_MAC + b"\xff" * 6 + b"\x08\x00" + b"\0" * 40, "bad-source-mac"),
    (fb.GATEWAY_MAC + fb.GUEST_MAC + b"\x08\x00" + b"\x45\x00", "short-ipv4"),
    (fb.GATEWAY_MAC + fb.GUEST_MAC + b"\x08\x00" + b"\x65" + b"\0" * 30, "bad-ip-version"),
    (fb.GATEWAY_MAC + fb.GUEST_MAC + b"\x08\x00" + b"\x45\x00\x05\xdc" + b"\0" * 30, "truncated-ipv4"),
    (fb.GATEWAY_MAC + fb.GUEST_MAC + b"\x08\x00" + b"\x41\x00\x00\x20" + b"\0" * 30, "bad-ipv4-length"),
])
def test_malformed_frames_are_dropped_and_counted(dispatcher, frame, reason):
    dispatcher.frames_received([frame])
    assert dispatcher.drops[reason] == 1
    assert dispatcher.link.sent == []


def test_bad_ip_checksum_and_fragments_are_counted(dispatcher):
    good = bytearray(fb.echo_request())
    good[24] ^= 0xFF  # corrupt the IP header checksum
    frag = fb.ethernet(fb.ipv4(b"\0" * 16, 17, mf=1))
    dispatcher.frames_received([bytes(good), frag])
    assert dispatcher.drops["bad-ipv4-checksum"] == 1
    assert dispatcher.drops["ipv4-fragment"] == 1


def test_random_garbage_never_raises(dispatcher):
    rng = random.Random(1234)
    seeds = [fb.arp_request(), fb.echo_request(), fb.udp(68, 67, b"\0" * 300),
             fb.tcp(1, 2, payload=b"hello")]
    frames = []
    for _ in range(5000):
        base = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        if rng.random() < 0.3:
            del base[rng.randrange(len(base)):]
        frames.append(bytes(base))
    dispatcher.frames_received(frames)
    assert dispatcher.frames_in == 5000
    assert dispatcher.drops["handler-error"] == 0


def test_arp_core_rejects_garbage():
    core = ArpResponder({fb.ip4("10.0.2.1")}, fb.GATEWAY_MAC)
    assert core.handle(b"\x00" * 20) is None
    assert sum(core.drops.values()) == 1


def test_echo_core_checks_checksum():
    core = GatewayEcho()
    assert core.handle(b"\x08\x00\x00\x00\x00\x01\x00\x01") is None
    assert core.drops["icmp-bad-checksum"] == 1
