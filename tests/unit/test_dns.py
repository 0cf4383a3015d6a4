"""DNS on the gateway.

Unit tests drive DnsResolverProxy / DnsHandler without sockets (a Clock or a
memory reactor, a fake upstream resolver, queries built with twisted.names).
Real-guest tests run dig and busybox nslookup in a namespace guest against a
twistd stack whose only upstream is a twisted.names server this module starts
on 127.0.0.1: no query ever leaves the machine.
"""


import struct

import dpkt
import pytest
import framebuild as fb
from dnsfakes import (
    BIG,
    GATEWAY,
    FakeUpstream,
    a_records,
    addresses,
    decode,
    query,
    soa,
    standard_table,
)
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns

from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.policy import Egress
from arcbox_net.protocols.dns import (
    DnsHandler,
    DnsResolverProxy,
    encode_reply,
    retry_schedule,
)


class _FakeUdpPort:
    def __init__(self, protocol, reactor):
        self.protocol, self.reactor, self.written = protocol, reactor, []
        self.closed = False

    def write(self, data, addr):
        self.written.append((data, addr))
        self.reactor.sent.append((data, addr, self.protocol))

    def stopListening(self):
        self.closed = True


class UdpClock(task.Clock):
    """A Clock with a fake listenUDP, enough for a real client.Resolver."""

    def __init__(self):
        super().__init__()
        self.sent = []
        self.ports = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        p = _FakeUdpPort(protocol, self)
        self.ports.append(p)
        protocol.makeConnection(p)
        return p


def test_real_client_resolver_retries_then_servfails_within_dns_timeout():
    clock = UdpClock()
    config = StackConfig(dns_upstreams=["127.0.0.1:5353"], dns_timeout=5.0)
    proxy = DnsResolverProxy(config, reactor=clock)
    out = []
    proxy.answer(query("lost.example.test")).addCallback(out.append)
    clock.pump([0.01] * 400)
    assert out == [] and len(clock.sent) >= 2          # retransmitted
    assert {addr for _, addr, _ in clock.sent} == {("127.0.0.1", 5353)}
    clock.pump([0.01] * 100)                            # 5 s: dns_timeout
    assert decode(out[0]).rCode == dns.ESERVER
    proxy.stop()
    assert not [c for c in clock.getDelayedCalls() if c.active()]
    assert all(p.closed for p in clock.ports)


def test_real_client_resolver_passes_nxdomain_and_answers_through():
    clock = UdpClock()
    proxy = DnsResolverProxy(StackConfig(dns_upstreams=["127.0.0.1:5353"]), reactor=clock)

    def answer_last(rcode, answers=(), authority=()):
        data, addr, protocol = clock.sent[-1]
        q = decode(data)
        r = dns.Message(id=q.id, answer=1, rCode=rcode)
        r.queries = q.queries
        r.answers, r.authority = list(answers), list(authority)
        protocol.datagramReceived(r.toStr(), addr)

    out = []
    proxy.answer(query("gone.example.test")).addCallback(out.append)
    answer_last(dns.ENAME, authority=[soa()])
    m = decode(out.pop())
    assert m.rCode == dns.ENAME and [r.type for r in m.authority] == [dns.SOA]
    proxy.answer(query("there.example.test", dns.AAAA)).addCallback(out.append)
    answer_last(dns.OK, authority=[soa()])
    m = decode(out.pop())
    assert m.rCode == dns.OK and m.answers == []
    proxy.answer(query("up.example.test")).addCallback(out.append)
    answer_last(dns.OK, answers=a_records(b"up.example.test", ["192.0.2.99"], ttl=5))
    assert addresses(decode(out.pop())) == ["192.0.2.99"]
    proxy.stop()


def test_retry_schedule_adds_up_to_the_timeout():
    for total in (0.3, 1, 2.5, 5, 30):
        schedule = retry_schedule(total)
        assert abs(sum(schedule) - total) < 1e-9 and all(t > 0 for t in schedule)
    assert retry_schedule(5) == (1.0, 2.0, 2.0)


def test_encode_reply_drops_additional_before_setting_tc():
    m = dns.Message(id=1, answer=1)
    m.queries = [dns.Query(b"x.test", dns.A)]
    m.answers = a_records(b"x.test", ["192.0.2.1"])
    m.additional = a_records(b"extra.test", BIG)
    wire, truncated = encode_reply(m, 512)
    r = decode(wire)
    assert not truncated and not r.trunc and addresses(r) == ["192.0.2.1"] and not r.additional


class FakeLink:
    description = "fake"
    mtu = 1500

    def __init__(self):
        self.frames = []

    def send_frame(self, frame):
        self.frames.append(b"".join(frame) if isinstance(frame, list) else bytes(frame))


def make_handler(config=None, table=None):
    config = config or StackConfig()
    link = FakeLink()
    dispatcher = FrameDispatcher(config, link)
    egress = Egress(config)
    reactor = MemoryReactorClock()
    handler = DnsHandler(dispatcher, config, egress, reactor=reactor,
                         upstream=FakeUpstream(standard_table() if table is None else table))
    dispatcher.register(handler)
    return handler, dispatcher, link, egress, reactor


def test_handler_answers_udp_from_the_queried_address():
    handler, dispatcher, link, _, _ = make_handler()
    dispatcher.frames_received([fb.udp(40000, 53, query("host.arcbox.internal", qid=5))])
    (frame,) = link.frames
    eth = fb.parse(frame)
    assert eth.dst == fb.GUEST_MAC and eth.src == fb.GATEWAY_MAC
    ip = eth.data
    assert ip.src == fb.ip4(GATEWAY) and ip.dst == fb.ip4(fb.GUEST_IP)
    udp = ip.data
    assert udp.sport == 53 and udp.dport == 40000
    # checksums as a kernel would check them
    assert bytes(dpkt.ethernet.Ethernet(frame)) == frame
    m = decode(udp.data)
    assert m.id == 5 and addresses(m) == [GATEWAY]


def test_handler_only_serves_stack_addresses():
    handler, dispatcher, link, _, _ = make_handler()
    dispatcher.frames_received([fb.udp(40000, 53, query("host.arcbox.internal"),
                                       dst="192.0.2.53")])
    assert link.frames == [] and handler.counters["dns-queries"] == 0


def test_handler_counts_malformed_in_stack_stats():
    handler, dispatcher, link, _, _ = make_handler()
    dispatcher.frames_received([fb.udp(40000, 53, b"\x00\x01junk"),
                                fb.udp(40000, 53, struct.pack("!6H", 1, 0x0100, 0, 0, 0, 0))])
    assert link.frames == []
    assert handler.drops == {"dns-short": 1, "dns-malformed": 1}
    assert dispatcher.drops["handler-error"] == 0


def test_handler_start_registers_tcp_for_the_nat_and_stop_closes():
    handler, dispatcher, _, egress, reactor = make_handler()
    handler.start()
    ((port, factory, _, interface),) = reactor.tcpServers
    assert port == 0 and interface == "127.0.0.1" and factory is handler.proxy
    host_port = handler.tcp_port.getHost().port
    assert egress.local_services[(fb.ip4(GATEWAY), 53)] == ("127.0.0.1", host_port)
    handler.stop()
    assert handler.tcp_port is None


def test_slow_upstream_does_not_hold_other_queries():
    handler, dispatcher, link, _, reactor = make_handler(StackConfig(dns_timeout=2))
    dispatcher.frames_received([fb.udp(40001, 53, query("slow.example.test", qid=1)),
                                fb.udp(40002, 53, query("host.arcbox.internal", qid=2))])
    assert [decode(fb.parse(f).data.data.data).id for f in link.frames] == [2]
    reactor.advance(2)
    replies = [decode(fb.parse(f).data.data.data) for f in link.frames]
    assert [(r.id, r.rCode) for r in replies] == [(2, dns.OK), (1, dns.ESERVER)]


def test_network_stack_wires_dns_in():
    from arcbox_net.stack import NetworkStack
    stack = NetworkStack(FakeLink(), StackConfig(dns_upstreams=["127.0.0.1:5300"]),
                         reactor=MemoryReactorClock())
    assert stack.dns in stack.parts
    stack.dispatcher.frames_received([fb.udp(40000, 53, b"\x01")])
    assert stack.stats()["drops"]["dns-short"] == 1


def _raw_query(labels, qid=77):
    """A query with the name's labels written by hand (no length checks)."""
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)


@pytest.mark.parametrize("labels", [
    [b"a" * 64, b"example", b"com"],                  # a label over 63 bytes
    [b"b" * 63] * 4 + [b"cc"],                        # 63*4+2 labels: 258 bytes on the wire
])
def test_oversized_names_get_formerr_and_are_never_forwarded(labels):
    upstream = FakeUpstream(standard_table())
    proxy = DnsResolverProxy(StackConfig(), reactor=task.Clock(), upstream=upstream)
    results = []
    proxy.answer(_raw_query(labels)).addCallback(results.append)
    (wire,) = results
    reply = decode(wire)
    assert reply.id == 77 and reply.rCode == dns.EFORMAT and reply.answer
    assert upstream.queries == []
    assert proxy.drops["dns-bad-name"] == 1
    # The longest legal name still goes upstream.
    proxy.answer(_raw_query([b"b" * 63] * 3 + [b"c" * 61]))
    assert len(upstream.queries) == 1


def test_an_upstream_socket_failing_for_want_of_fds_is_one_counted_line():
    import errno

    from twisted.internet.error import CannotListenError
    from twisted.logger import globalLogPublisher

    class NoFds:
        def query(self, q, timeout=None):
            raise CannotListenError("", 0, OSError(errno.EMFILE, "Too many open files"))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proxy = DnsResolverProxy(StackConfig(), reactor=task.Clock(), upstream=NoFds())
        results = []
        for i in range(50):
            proxy.answer(query(f"n{i}.example.com", qid=i)).addCallback(results.append)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [decode(w).rCode for w in results] == [dns.ESERVER] * 50
    assert proxy.drops["dns-upstream-no-socket"] == 50
    ours = [e for e in events if e.get("log_namespace", "").startswith("arcbox_net")]
    assert 1 <= len(ours) <= 5
    assert not any(e.get("log_failure") for e in ours)
