"""Properties of the protocol cores under arbitrary guest input: the frame
dispatcher (every frame is handled or counted as a drop, exactly once), the
ARP responder, the DHCP server (never two clients on one address, an ACK only
for what that client was offered), the DNS proxy (a reply with the query's id
or a counted drop, never an internal error) and the neighbour table."""

import ipaddress
import struct

import dpkt
from hypothesis import event, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.names import dns, error
from zope.interface import implementer

from framebuild import FakeLink
import framebuild as fb
from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.interfaces import IEthernetHandler, IIPv4Handler, IUDPService
from arcbox_net.neighbours import NeighbourTable
from arcbox_net.protocols.arp import ArpResponder
from arcbox_net.protocols.dhcp import DhcpServer
from arcbox_net.protocols.dns import DnsResolverProxy, MalformedQuery, parse_query

FAST = settings(max_examples=100, deadline=None)

GW = bytes([10, 0, 2, 1])
GW_MAC = bytes.fromhex("02abcb000001")


# -- the dispatcher


@implementer(IIPv4Handler)
class IpRecorder:
    def __init__(self, proto, seen):
        self.ip_protocol = proto
        self.seen = seen

    def handle_ipv4(self, frame, ip):
        self.seen.append(("ip", ip.protocol))


@implementer(IEthernetHandler)
class ArpRecorder:
    ethertype = 0x0806

    def __init__(self, seen):
        self.seen = seen

    def handle_frame(self, frame):
        self.seen.append(("arp",))


@implementer(IUDPService)
class DhcpRecorder:
    udp_port = 67
    local_only = False

    def __init__(self, seen):
        self.seen = seen

    def handle_datagram(self, frame, ip, src_port, payload):
        self.seen.append(("dhcp", src_port))


def _recording_dispatcher():
    seen = []
    d = FrameDispatcher(StackConfig(ipv6=False), FakeLink(), clock=task.Clock().seconds)
    d.guest_mac = fb.GUEST_MAC
    for handler in (IpRecorder(1, seen), IpRecorder(6, seen), IpRecorder(17, seen),
                    ArpRecorder(seen), DhcpRecorder(seen)):
        d.register(handler)
    return d, seen


valid_frames = st.sampled_from([
    fb.arp_request(), fb.echo_request(), fb.udp(68, 67, b"\0" * 300, src="0.0.0.0",
                                                dst="255.255.255.255", dst_mac=b"\xff" * 6),
    fb.tcp(1000, 80, dst="203.0.113.10", payload=b"hello"), fb.udp(5000, 9999, b"x"),
    fb.udp(5000, 53, b"q"), fb.ethernet(b"\0" * 40, 0x86DD),
])


@st.composite
def guest_frames(draw):
    """A valid frame with a few bytes changed and maybe cut, or any bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))
    frame = bytearray(draw(valid_frames))
    for _ in range(draw(st.integers(0, 4))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame[:draw(st.integers(0, len(frame)))])


@FAST
@given(st.lists(guest_frames(), max_size=8))
def test_dispatcher_hands_over_or_counts_every_frame_exactly_once(frames):
    d, seen = _recording_dispatcher()
    for frame in frames:
        before_seen, before_drops = len(seen), sum(d.drops.values())
        d.frames_received([frame])
        handled = len(seen) - before_seen
        dropped = sum(d.drops.values()) - before_drops
        assert handled + dropped == 1, (frame.hex(), dict(d.drops), seen[before_seen:])
        assert d.drops["handler-error"] == 0
    assert d.frames_in == len(frames)
    # A batch is the same as its frames one by one.
    d2, seen2 = _recording_dispatcher()
    d2.frames_received(frames)
    assert seen2 == seen and d2.drops == d.drops


# -- ARP


@FAST
@given(st.binary(max_size=64))
def test_arp_responder_takes_any_bytes(frame):
    learned = []
    core = ArpResponder([GW], GW_MAC, lambda a, m: learned.append((a, m)) or True)
    result = core.handle(frame)
    if result is not None:
        mac, body = result
        reply = dpkt.arp.ARP(body)
        assert reply.op == 2 and reply.sha == GW_MAC and reply.spa == GW and reply.tha == mac
    for address, mac in learned:
        assert mac == frame[6:12] and address not in (GW, b"\0\0\0\0")


@FAST
@given(st.sampled_from([1, 2]), st.binary(min_size=6, max_size=6), st.binary(min_size=4, max_size=4),
       st.sampled_from([GW, bytes([10, 0, 2, 2]), bytes([10, 0, 2, 99])]), st.booleans())
def test_arp_request_answered_exactly_for_owned_targets(op, sha, spa, tpa, same_src):
    src = sha if same_src else b"\x02\x99\x99\x99\x99\x99"
    arp = dpkt.arp.ARP(hrd=1, pro=0x0800, hln=6, pln=4, op=op, sha=sha, spa=spa,
                       tha=b"\0" * 6, tpa=tpa)
    frame = fb.ethernet(arp, 0x0806, src=src, dst=b"\xff" * 6)
    learned = []
    core = ArpResponder([GW], GW_MAC, lambda a, m: learned.append((a, m)) or True)
    result = core.handle(frame)
    assert (result is not None) == (op == 1 and tpa == GW and spa != GW)
    if result is not None:
        reply = dpkt.arp.ARP(result[1])
        assert (result[0], reply.tha, reply.tpa, reply.spa) == (sha, sha, spa, GW)
    wanted = src == sha and spa not in (GW, b"\0\0\0\0")
    assert learned == ([(spa, sha)] if wanted else [])


# -- DHCP


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


MACS = [bytes([2, 0, 0, 0, 0, i]) for i in range(1, 6)]
POOL_PROBE = [ipaddress.IPv4Address(f"10.0.2.{i}") for i in (0, 1, 2, 3, 4, 5, 200, 255)]


def _dhcp(mtype, mac, xid, requested=None, ciaddr=0, server_id=None):
    opts = [(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([mtype]))]
    if requested is not None:
        opts.append((dpkt.dhcp.DHCP_OPT_REQ_IP, requested.packed))
    if server_id is not None:
        opts.append((dpkt.dhcp.DHCP_OPT_SERVER_ID, server_id))
    return bytes(dpkt.dhcp.DHCP(op=1, chaddr=mac, xid=xid, ciaddr=ciaddr, opts=opts))


dhcp_steps = st.lists(st.tuples(
    st.sampled_from(["discover", "request", "renew", "release", "decline", "inform", "time"]),
    st.integers(0, len(MACS) - 1),
    st.one_of(st.none(), st.sampled_from(POOL_PROBE), st.just("offered")),
    st.sampled_from([1.0, 31.0, 601.0, 3601.0]),
    st.sampled_from([None, GW, b"\x0a\x00\x02\x09"]),
), max_size=30)


@settings(max_examples=100, deadline=None)
@given(dhcp_steps, st.booleans())
def test_dhcp_never_doubles_an_address_and_acks_only_what_it_offered(script, static):
    clock = Clock()
    config = StackConfig(subnet="10.0.2.0/29", lease_time=3600,
                         static_leases=[(MACS[4], "10.0.2.6")] if static else ())
    server = DhcpServer(config, clock)
    bound = {}
    server.on_bind = lambda lease: bound.__setitem__(lease.address, lease.mac)
    server.on_unbind = lambda lease: bound.pop(lease.address, None)
    given_to = {mac: set() for mac in MACS}  # addresses offered or acked to each MAC
    reserved = {ipaddress.IPv4Address(a) for a in ("10.0.2.0", "10.0.2.1", "10.0.2.7")}
    xid = 0
    for action, who, requested, dt, server_id in script:
        mac = MACS[who]
        xid += 1
        if requested == "offered":
            requested = next(iter(sorted(given_to[mac])), None)
        if action == "time":
            clock.now += dt
            continue
        lease = server.lease_for(mac)
        held = lease.address if lease is not None else None
        kind, payload = {
            "discover": (1, lambda: _dhcp(1, mac, xid, requested)),
            "request": (3, lambda: _dhcp(3, mac, xid, requested, server_id=server_id)),
            "renew": (3, lambda: _dhcp(3, mac, xid, ciaddr=int(held or 0))),
            "release": (7, lambda: _dhcp(7, mac, xid, ciaddr=int(held or 0))),
            "decline": (4, lambda: _dhcp(4, mac, xid, held)),
            "inform": (8, lambda: _dhcp(8, mac, xid)),
        }[action]
        reply = server.handle(payload())
        if reply is not None:
            assert len(reply.payload) >= 300
            msg = dpkt.dhcp.DHCP(reply.payload)
            assert msg.op == 2 and msg.xid == xid and msg.chaddr[:6] == mac
            yiaddr = ipaddress.IPv4Address(msg.yiaddr)
            mtype = reply.message_type
            event(f"reply {mtype}")
            if mtype == dpkt.dhcp.DHCPOFFER:
                assert yiaddr not in reserved and yiaddr in config.subnet
                given_to[mac].add(yiaddr)
            elif mtype == dpkt.dhcp.DHCPACK and kind == 3:
                assert yiaddr in given_to[mac] or (static and mac == MACS[4])
                given_to[mac].add(yiaddr)
            elif mtype == dpkt.dhcp.DHCPNAK:
                assert yiaddr == ipaddress.IPv4Address(0)
        leases = server.leases()
        addresses = [le.address for le in leases]
        assert len(addresses) == len(set(addresses)), leases
        assert not reserved & set(addresses)
        assert all(a in config.subnet for a in addresses)
        assert bound == {le.address: le.mac for le in leases if le.state == "bound"}


_BOOTP = bytes(dpkt.dhcp.DHCP(op=1, chaddr=MACS[0], xid=99, opts=[]))[:240]  # up to the magic


@FAST
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.sampled_from([b"", b"\x35\x01\x01", b"\x35\x01\x03",
                                            b"\x35\x01\x08", b"\x35\x02\x01\x01"]),
                           st.binary(max_size=80)).map(lambda t: _BOOTP + t[0] + t[1])))
def test_dhcp_takes_any_bytes(payload):
    """Any bytes, and a valid header with a message type (or not) and any
    options after it."""
    server = DhcpServer(StackConfig(), Clock())
    reply = server.handle(payload)
    if reply is None:
        assert sum(server.drops.values()) >= 1
    else:
        msg = dpkt.dhcp.DHCP(reply.payload)
        assert len(reply.payload) >= 300 and msg.op == 2 and msg.xid == 99
        event("replied")


# -- DNS


class Upstream:
    """Answers every name in one way, at once."""

    def __init__(self, how):
        self.how = how
        self.queries = 0

    def query(self, q, timeout=None):
        self.queries += 1
        if self.how == "answer":
            return defer.succeed(([dns.RRHeader(q.name.name, dns.A, dns.IN, 60,
                                                dns.Record_A("192.0.2.7", 60))] * 3, [], []))
        if self.how == "many":
            return defer.succeed(([dns.RRHeader(q.name.name, dns.A, dns.IN, 60,
                                                dns.Record_A(f"192.0.2.{i}", 60))
                                   for i in range(1, 120)], [], []))
        return defer.fail({"nxdomain": error.DNSNameError, "servfail": error.DNSServerError,
                           "refused": error.DNSQueryRefusedError,
                           "timeout": defer.TimeoutError}[self.how]())


upstreams = st.sampled_from(["answer", "many", "nxdomain", "servfail", "refused", "timeout"])


def _answer(payload, how):
    proxy = DnsResolverProxy(StackConfig(dns_records=["fuzz.test=10.0.2.9"]), reactor=task.Clock(),
                             upstream=Upstream(how))
    results = []
    proxy.answer(payload).addBoth(results.append)
    assert len(results) == 1, "no answer without the clock moving"
    return proxy, results[0]


def _check_reply(proxy, payload, wire, limit):
    assert not isinstance(wire, Exception) and proxy.drops["dns-internal-error"] == 0
    if wire is None:
        assert sum(proxy.drops.values()) == 1
        return None
    assert isinstance(wire, bytes) and len(wire) <= limit
    assert wire[:2] == bytes(payload[:2]) and wire[2] & 0x80  # the query's id, QR set
    reply = dns.Message()
    reply.fromStr(wire)
    return reply


@FAST
@given(st.binary(max_size=120), upstreams)
def test_dns_proxy_answers_or_counts_any_bytes(payload, how):
    try:
        parse_query(payload)
    except MalformedQuery:
        pass
    proxy, wire = _answer(payload, how)
    _check_reply(proxy, payload, wire, 512)


dns_label = st.one_of(st.text("abcxyz019-", min_size=1, max_size=12).map(str.encode),
                      st.binary(min_size=1, max_size=70))


@FAST
@given(st.lists(dns_label, min_size=1, max_size=6), st.sampled_from([1, 28, 15, 16, 255, 252, 0]),
       st.sampled_from([1, 3, 255, 4]), st.sampled_from([0, 2, 5]),
       st.one_of(st.none(), st.integers(0, 65535)), st.sampled_from([0, 1]), upstreams,
       st.integers(0, 0xFFFF))
def test_dns_proxy_replies_to_structured_queries(labels, qtype, qclass, opcode, edns_size,
                                                edns_version, how, qid):
    name = b"".join(bytes([len(lb)]) + lb for lb in labels if len(lb) < 64) or b"\x01a"
    name += b"\x00"
    payload = struct.pack("!HHHHHH", qid, (opcode << 11) | 0x0100, 1, 0, 0,
                          1 if edns_size is not None else 0) + name + struct.pack("!HH", qtype,
                                                                                  qclass)
    if edns_size is not None:
        payload += b"\x00" + struct.pack("!HHIH", dns.OPT, edns_size, edns_version << 16, 0)
    proxy, wire = _answer(payload, how)
    limit = 512 if edns_size is None else max(512, min(edns_size, 4096))
    reply = _check_reply(proxy, payload, wire, limit)
    assert reply is not None, dict(proxy.drops)  # a well-formed query always gets an answer
    wire_len = len(name)
    if wire_len > 255:
        assert reply.rCode == dns.EFORMAT
    elif opcode != 0 and not edns_version:
        assert reply.rCode == dns.ENOTIMP
    if edns_size is None:
        assert not any(r.type == dns.OPT for r in reply.additional)


# -- the neighbour table


neighbour_steps = st.lists(st.tuples(
    st.sampled_from(["bind", "unbind", "claim", "expire", "time"]),
    st.integers(0, 11),     # address index
    st.integers(0, 3),      # MAC index
    st.sampled_from([1.0, 100.0, 301.0, 5000.0]),
), max_size=40)
ADDRS = [bytes([10, 0, 2, i]) for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255)] + [bytes([192, 0, 2, 4])]
NMACS = [bytes([2, 1, 1, 1, 1, i]) for i in range(4)]


@settings(max_examples=100, deadline=None)
@given(neighbour_steps, st.booleans())
def test_neighbour_table_invariants(script, any_source):
    config = StackConfig(allow_any_source=any_source,
                         static_leases=[(NMACS[3], "10.0.2.9")])
    table = NeighbourTable(config, ttl=300.0, max_entries=4)
    now = 0.0
    leases = {}  # address -> (mac, until)
    not_guests = {ADDRS[0], ADDRS[1], ADDRS[10]}
    for action, a, m, dt in script:
        address, mac = ADDRS[a], NMACS[m]
        if action == "time":
            now += dt
        elif action == "bind" and address not in not_guests and a not in (9, 11):
            # What DHCP binds: a guest address of the subnet, not the static one.
            table.bind(address, mac, now + dt)
            leases[address] = (mac, now + dt)
        elif action == "unbind":
            table.unbind(address, mac)
            if leases.get(address, (None,))[0] == mac:
                del leases[address]
        elif action == "claim":
            if table.valid_source(address, mac, now):
                table.confirm(address, mac, now)
                assert table.macs[address] == mac
        elif action == "expire":
            table.expire(now)
        assert len(table.macs) <= 4 and set(table.macs) == set(table.seen)
        for addr in not_guests:
            assert not table.valid_source(addr, NMACS[0], now) or (any_source and addr != ADDRS[1]
                                                                  and addr != ADDRS[0]
                                                                  and addr != ADDRS[10])
        if not any_source:
            assert not table.valid_source(ADDRS[11], NMACS[0], now)  # outside the subnet
            assert table.valid_source(ADDRS[9], NMACS[3], now)      # the static lease
            assert not table.valid_source(ADDRS[9], NMACS[0], now)
            for addr, (owner, until) in leases.items():
                if until > now:
                    others = [x for x in NMACS if x != owner]
                    assert table.valid_source(addr, owner, now)
                    assert not any(table.valid_source(addr, x, now) for x in others)
