"""ICMP echo NAT: identifier rewriting, the handler with fake backends, and
real guests pinging loopback-mapped addresses (raw socket and ping sockets).

Every stack started here runs with ``--deny 0.0.0.0/0 --allow 127.0.0.0/8``
and reaches "remote" hosts only through ``--map`` onto loopback.
"""


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
    parse_raw_packet,
    with_ident,
)
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
    assert parsed == ("error", 3, 1, fb.ip4("127.0.0.9"), 4242)
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
