"""DNS on the gateway.

Unit tests drive DnsResolverProxy / DnsHandler without sockets (a Clock or a
memory reactor, a fake upstream resolver, queries built with twisted.names).
Real-guest tests run dig and busybox nslookup in a namespace guest against a
twistd stack whose only upstream is a twisted.names server this module starts
on 127.0.0.1: no query ever leaves the machine.
"""


import ipaddress
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
    GATEWAY_NAMES,
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


# -- IPv6 (issue 16)

GATEWAY6 = "fd00::1"
GUEST6 = "fd00::2"


def a6(text):
    return ipaddress.IPv6Address(text).packed


def aaaa(m):
    return [str(ipaddress.IPv6Address(r.payload.address)) for r in m.answers
            if r.type == dns.AAAA]


def ask(proxy, wire, **kw):
    out = []
    proxy.answer(wire, **kw).addCallback(out.append)
    assert out, "the proxy did not answer synchronously"
    return out[0]


def make_proxy(config=None, table=None):
    upstream = FakeUpstream(standard_table() if table is None else table)
    return DnsResolverProxy(config or StackConfig(), reactor=task.Clock(),
                            upstream=upstream), upstream


@pytest.mark.parametrize("name", GATEWAY_NAMES)
def test_local_names_answer_aaaa_with_the_v6_gateway(name):
    proxy, upstream = make_proxy()
    m = decode(ask(proxy, query(name, dns.AAAA)))
    assert m.rCode == dns.OK and m.auth and aaaa(m) == [GATEWAY6]
    assert addresses(decode(ask(proxy, query(name)))) == [GATEWAY]      # A unchanged
    both = decode(ask(proxy, query(name, dns.ALL_RECORDS)))
    assert addresses(both) == [GATEWAY] and aaaa(both) == [GATEWAY6]
    assert not upstream.queries


def test_aaaa_follows_the_v6_gateway_and_is_absent_without_ipv6():
    proxy, _ = make_proxy(StackConfig(ipv6_subnet="fd12:3456::/64"))
    assert aaaa(decode(ask(proxy, query("host.arcbox.internal", dns.AAAA)))) == ["fd12:3456::1"]
    proxy, upstream = make_proxy(StackConfig(ipv6=False))
    m = decode(ask(proxy, query("host.arcbox.internal", dns.AAAA)))
    assert m.rCode == dns.OK and m.answers == [] and [r.type for r in m.authority] == [dns.SOA]
    assert addresses(decode(ask(proxy, query("host.arcbox.internal")))) == [GATEWAY]
    assert not upstream.queries


def test_v6_dns_records_answer_aaaa_and_each_family_alone_is_no_data():
    config = StackConfig(dns_records=["v6only.test=2001:db8::5", "both.test=10.0.2.40",
                                      "both.test=2001:DB8::0:40", "v4only.test=10.0.2.41",
                                      "host.docker.internal=2001:db8::7"])
    proxy, upstream = make_proxy(config)
    m = decode(ask(proxy, query("v6only.test", dns.AAAA)))
    assert m.rCode == dns.OK and m.auth and aaaa(m) == ["2001:db8::5"]
    for name, qtype in (("v6only.test", dns.A), ("v4only.test", dns.AAAA)):
        m = decode(ask(proxy, query(name, qtype)))
        assert (m.rCode, m.answers) == (dns.OK, []), name        # never NXDOMAIN
        assert [r.type for r in m.authority] == [dns.SOA]
    assert addresses(decode(ask(proxy, query("both.test")))) == ["10.0.2.40"]
    assert aaaa(decode(ask(proxy, query("both.test", dns.AAAA)))) == ["2001:db8::40"]
    # A v6 record replaces a built-in name: its A (the v4 gateway) is gone too.
    assert aaaa(decode(ask(proxy, query("host.docker.internal", dns.AAAA)))) == ["2001:db8::7"]
    assert decode(ask(proxy, query("host.docker.internal"))).answers == []
    assert not upstream.queries


def test_reverse_lookups_of_v6_addresses():
    proxy, upstream = make_proxy(StackConfig(dns_records=["v6only.test=2001:db8::5"]))
    for address, name in ((GATEWAY6, b"host.arcbox.internal"), ("2001:db8::5", b"v6only.test")):
        ptr = ipaddress.IPv6Address(address).reverse_pointer
        assert ptr.endswith(".ip6.arpa")
        m = decode(ask(proxy, query(ptr, dns.PTR)))
        assert m.rCode == dns.OK and [r.payload.name.name for r in m.answers] == [name]
    assert not upstream.queries


def udp6(sport, dport, payload, src=GUEST6, dst=GATEWAY6):
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    u.ulen = len(u)
    packet = dpkt.ip6.IP6(src=a6(src), dst=a6(dst), nxt=17, hlim=64, data=u)
    packet.plen = len(u)
    return fb.ethernet(packet, 0x86DD)


def make_handler6(config=None):
    handler, dispatcher, link, egress, reactor = make_handler(config)
    dispatcher.framer.learn(a6(GUEST6), fb.GUEST_MAC)
    return handler, dispatcher, link, egress, reactor


def test_handler_answers_udp_over_ipv6_from_the_queried_address():
    handler, dispatcher, link, _, _ = make_handler6()
    dispatcher.frames_received([udp6(40000, 53, query("host.arcbox.internal", dns.AAAA, qid=6)),
                                udp6(40001, 53, query("www.example.test", qid=7),
                                     dst="fe80::1", src=GUEST6)])
    frames = [fb.parse(f) for f in link.frames]
    assert [f.type for f in frames] == [0x86DD, 0x86DD]
    first, second = (f.data for f in frames)
    assert (first.src, first.dst) == (a6(GATEWAY6), a6(GUEST6))
    assert (first.data.sport, first.data.dport) == (53, 40000)
    # The UDP checksum (over the IPv6 pseudo-header) is what a kernel checks.
    sent = first.data.sum
    first.data.sum = 0
    assert dpkt.ip6.IP6(bytes(first)).data.sum == sent
    m = decode(first.data.data)
    assert m.id == 6 and aaaa(m) == [GATEWAY6]
    assert second.src == a6("fe80::1") and addresses(decode(second.data.data)) == ["192.0.2.10"]
    assert handler.counters["dns-queries"] == 2


def test_handler_serves_only_the_stacks_v6_addresses():
    handler, dispatcher, link, _, _ = make_handler6()
    dispatcher.frames_received([udp6(40000, 53, query("host.arcbox.internal"),
                                     dst="2001:db8::53")])
    assert link.frames == [] and handler.counters["dns-queries"] == 0


def test_udp6_replies_fit_the_smaller_ipv6_payload_and_say_so_in_opt():
    handler, dispatcher, link, _, _ = make_handler6()
    assert (handler.proxy.max_udp_payload, handler.proxy.max_udp_payload6) == (1472, 1452)
    dispatcher.frames_received([udp6(40000, 53, query("host.arcbox.internal", edns_size=4096)),
                                fb.udp(40000, 53, query("host.arcbox.internal", edns_size=4096))])
    opts = [[r for r in decode(fb.parse(f).data.data.data).additional if r.type == dns.OPT]
            for f in link.frames]
    assert [o[0].cls for o in opts] == [1452, 1472]


def test_handler_start_registers_tcp_for_the_v6_addresses_too():
    handler, _, _, egress, _ = make_handler6()
    handler.start()
    host_port = handler.tcp_port.getHost().port
    for address in (GATEWAY, GATEWAY6, "fe80::1"):
        key = (ipaddress.ip_address(address).packed, 53)
        assert egress.local_services[key] == ("127.0.0.1", host_port), address
    # The TCP NAT asks the egress: [fd00::1]:53 is the stack's listener, not ::1.
    assert egress.route(a6(GATEWAY6), 53) == ("127.0.0.1", host_port)
    handler.stop()
    off, _, _, egress, _ = make_handler(StackConfig(ipv6=False))
    off.start()
    assert [len(a) for a, _port in egress.local_services] == [4]
    off.stop()


def test_ipv6_off_serves_no_v6_dns():
    handler, dispatcher, link, _, _ = make_handler6(StackConfig(ipv6=False))
    dispatcher.frames_received([udp6(40000, 53, query("host.arcbox.internal", dns.AAAA))])
    assert link.frames == [] and handler.counters["dns-queries"] == 0


def test_v6_upstream_is_asked_from_an_ipv6_socket():
    clock = UdpClock()
    clock.interfaces = []
    listen = clock.listenUDP

    def listen_udp(port, protocol, interface="", maxPacketSize=8192):
        clock.interfaces.append(interface)
        return listen(port, protocol, interface, maxPacketSize)
    clock.listenUDP = listen_udp
    config = StackConfig(dns_upstreams=["[::1]:5353"])
    assert config.dns_upstreams == ((ipaddress.IPv6Address("::1"), 5353),)
    proxy = DnsResolverProxy(config, reactor=clock)
    out = []
    proxy.answer(query("up6.example.test", dns.AAAA)).addCallback(out.append)
    data, addr, protocol = clock.sent[-1]
    assert addr == ("::1", 5353) and clock.interfaces == ["::"]
    q = decode(data)
    r = dns.Message(id=q.id, answer=1)
    r.queries = q.queries
    r.answers = [dns.RRHeader(b"up6.example.test", dns.AAAA, dns.IN, 30,
                              dns.Record_AAAA("2001:db8::66", ttl=30))]
    protocol.datagramReceived(r.toStr(), addr)
    m = decode(out[0])
    assert m.rCode == dns.OK and aaaa(m) == ["2001:db8::66"] and not m.auth
    proxy.stop()


def test_a_separate_v6_dns_address_is_served_and_names_answer_the_v6_gateway():
    """slirp4netns's -6 plan: gateway fd00::2, DNS fd00::3, guest fd00::100."""
    config = StackConfig(ipv6_gateway="fd00::2", ipv6_dns="fd00::3", ipv6_guest="fd00::100")
    handler, dispatcher, link, egress, _ = make_handler(config)
    dispatcher.framer.learn(a6("fd00::100"), fb.GUEST_MAC)
    dispatcher.frames_received([udp6(40000, 53, query("host.arcbox.internal", dns.AAAA),
                                     src="fd00::100", dst="fd00::3")])
    [frame] = [fb.parse(f) for f in link.frames]
    assert (frame.data.src, frame.data.dst) == (a6("fd00::3"), a6("fd00::100"))
    assert aaaa(decode(frame.data.data.data)) == ["fd00::2"]
    handler.start()
    assert egress.route(a6("fd00::3"), 53) == ("127.0.0.1", handler.tcp_port.getHost().port)
    handler.stop()


class _UdpRecordingReactor:
    """What PooledResolver needs of a reactor: listenUDP (recorded), a clock."""

    def __init__(self):
        from twisted.internet.task import Clock
        self.clock = Clock()
        self.ports = []
        self.seconds = self.clock.seconds
        self.callLater = self.clock.callLater

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        reactor = self

        class Port:
            def __init__(self):
                self.port, self.interface, self.closed, self.sent = port, interface, False, []

            def write(self, data, addr):
                self.sent.append((data, addr))

            def stopListening(self):
                self.closed = True
                protocol.doStop()

        transport = Port()
        protocol.makeConnection(transport)
        reactor.ports.append(transport)
        return transport


def test_upstream_queries_share_a_port_and_ports_rotate():
    """A guest asking for unique names makes the stack open a port per 100
    queries at most once a second (Twisted logs every port open and close)."""
    from arcbox_net.protocols.dns import MIN_PORT_LIFE, QUERIES_PER_PORT, PooledResolver
    reactor = _UdpRecordingReactor()
    resolver = PooledResolver(servers=[("127.0.0.1", 5300)], reactor=reactor)
    pending = []
    for i in range(QUERIES_PER_PORT * 2 + 1):
        pending.append(resolver.queryUDP([dns.Query(f"n{i}.test".encode(), dns.A)], timeout=[5]))
    # Within one second: one port took them all, the rest wait for time to pass.
    assert len(reactor.ports) == 1 and len(reactor.ports[0].sent) == len(pending)
    reactor.clock.advance(MIN_PORT_LIFE)
    pending.append(resolver.queryUDP([dns.Query(b"late.test", dns.A)], timeout=[5]))
    assert len(reactor.ports) == 2
    first, second = reactor.ports
    assert not first.closed          # queries still in flight on it
    reactor.clock.advance(10)        # every query of the first port times out
    for d in pending:
        d.addErrback(lambda f: None)
    assert first.closed and not second.closed
    # An answer to a query on the live port still reaches its Deferred.
    got = []
    resolver.queryUDP([dns.Query(b"again.test", dns.A)], timeout=[5]).addBoth(got.append)
    data, addr = second.sent[-1]
    query = dns.Message()
    query.fromStr(data)
    reply = dns.Message(id=query.id, answer=1)
    reply.queries = query.queries
    resolver._ports[4].proto.datagramReceived(reply.toStr(), addr)
    assert got and isinstance(got[0], dns.Message) and got[0].id == query.id
    assert len(reactor.ports) == 2
    resolver.close_ports()
    assert second.closed
