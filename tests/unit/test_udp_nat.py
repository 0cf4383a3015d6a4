"""UDP NAT: the flow table with a fake clock, the handler with fake host
sockets, the host socket's ICMP error handling on loopback, and a real guest.

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
from arcbox_net.protocols.hostflows import Flow, FlowTable
from arcbox_net.protocols.udp_nat import UdpNat
from arcbox_net.wire.checksum import ones_sum
from arcbox_net.wire.ipv4 import fragment


def flow(name):
    return Flow(name)


def test_unreplied_flow_expires_after_the_timeout():
    t = FlowTable(60, 180, 10)
    f = flow("a")
    assert t.add(f, 100.0) == []
    assert t.next_deadline() == 160.0
    assert t.expire(159.9) == []
    t.outbound(f, 10, 150.0)              # guest traffic alone extends the short timeout
    assert t.next_deadline() == 210.0
    assert t.expire(209.9) == [] and len(t) == 1
    assert t.expire(210.0) == [f]
    assert len(t) == 0 and t.next_deadline() is None


def test_a_reply_gives_the_established_timeout():
    t = FlowTable(60, 180, 10)
    f = flow("a")
    t.add(f, 0.0)
    t.outbound(f, 10, 0.0)
    t.inbound(f, 20, 1.0)
    assert f.established and f.bytes_out == 10 and f.bytes_in == 20
    assert t.next_deadline() == 181.0
    assert t.expire(120.0) == []
    assert t.expire(181.0) == [f]


def test_next_deadline_and_expiry_with_mixed_timeouts():
    t = FlowTable(60, 180, 10)
    old, new = flow("old"), flow("new")
    t.add(old, 0.0)
    t.inbound(old, 1, 0.0)                # established: deadline 180
    t.add(new, 10.0)                       # unreplied: deadline 70
    assert t.next_deadline() == 70.0
    assert t.expire(70.0) == [new]         # the older but established flow stays
    assert t.next_deadline() == 180.0
    assert t.expire(180.0) == [old]


def test_the_cap_evicts_the_flow_idle_longest():
    t = FlowTable(60, 180, 3)
    a, b, c, d = (flow(n) for n in "abcd")
    t.add(a, 0.0)
    t.add(b, 1.0)
    t.add(c, 2.0)
    t.outbound(a, 1, 3.0)                  # a was created first but is busy
    assert t.add(d, 4.0) == [b]
    assert len(t) == 3 and t.get("b") is None and t.get("a") is a


def test_established_timeout_is_never_shorter_than_the_timeout():
    t = FlowTable(300, 180, 10)
    f = flow("a")
    t.add(f, 0.0)
    t.inbound(f, 1, 0.0)
    assert t.next_deadline() == 300.0


class FakeHostSocket:
    def __init__(self, nat, flow):
        self.nat = nat
        self.flow = flow
        self.sent = []
        self.closed = False
        self.address = ("127.0.0.1", 40000 + len(nat.table))

    def send(self, data):
        self.sent.append(data)

    def close(self):
        self.closed = True


class Harness:
    def __init__(self, **overrides):
        settings = dict(address_map=["203.0.113.10=127.0.0.2", "203.0.113.20=127.0.0.3"],
                        deny=["0.0.0.0/0", "127.0.0.3/32"], allow=["127.0.0.0/8"])
        settings.update(overrides)
        self.config = StackConfig(**settings)
        self.link = FakeLink()
        self.dispatcher = FrameDispatcher(self.config, self.link)
        self.dispatcher.guest_mac = fb.GUEST_MAC
        self.clock = Clock()
        self.clock.advance(1000)
        self.sockets = []
        self.egress = Egress(self.config)
        self.nat = UdpNat(self.dispatcher, self.config, self.egress, self.clock,
                          socket_factory=self._socket)
        self.dispatcher.register(self.nat)

    def _socket(self, nat, flow):
        s = FakeHostSocket(nat, flow)
        self.sockets.append(s)
        return s

    def guest_sends(self, sport, dst, dport, payload):
        self.dispatcher.frames_received([fb.udp(sport, dport, payload, dst=dst)])

    def flow(self, sport, dst, dport):
        return self.nat.table.get((fb.ip4(fb.GUEST_IP), sport, fb.ip4(dst), dport))


def udp_checksum_ok(ip):
    u = ip.data
    raw = bytes(u)
    pseudo = ip.src + ip.dst + bytes((0, 17)) + len(raw).to_bytes(2, "big")
    return ones_sum(pseudo + raw) == 0xFFFF


def test_gateway_goes_to_host_loopback_and_mapped_addresses_to_their_host():
    h = Harness()
    h.guest_sends(5000, fb.GATEWAY_IP, 5353, b"to the gateway")
    h.guest_sends(5001, "203.0.113.10", 7, b"to a mapped host")
    assert [s.flow.target for s in h.sockets] == [("127.0.0.1", 5353), ("127.0.0.2", 7)]
    assert [s.sent for s in h.sockets] == [[b"to the gateway"], [b"to a mapped host"]]
    assert h.link.take() == []


def test_a_flow_keeps_its_socket_and_counts_bytes():
    h = Harness()
    for i in range(3):
        h.guest_sends(5000, "203.0.113.10", 7, b"x" * (10 + i))
    assert len(h.sockets) == 1 and h.sockets[0].sent == [b"x" * 10, b"x" * 11, b"x" * 12]
    h.clock.advance(2)
    h.nat.host_datagram(h.sockets[0].flow, b"yy")
    [listing] = h.nat.flows()
    assert listing == {"protocol": "udp", "direction": "outbound", "guest": "10.0.2.2:5000",
                       "remote": "203.0.113.10:7", "host": "127.0.0.2:7",
                       "local": "127.0.0.1:40000", "state": "established",
                       "bytes_from_guest": 33, "bytes_to_guest": 2, "age": 2.0, "idle": 0.0}


def test_replies_come_from_the_address_and_port_the_guest_used():
    h = Harness()
    h.guest_sends(5000, "203.0.113.10", 7, b"ping")
    h.nat.host_datagram(h.sockets[0].flow, b"pong")
    [frame] = h.link.take()
    ip = frame.data
    assert frame.dst == fb.GUEST_MAC
    assert ip.src == fb.ip4("203.0.113.10") and ip.dst == fb.ip4(fb.GUEST_IP)
    assert ip.data.sport == 7 and ip.data.dport == 5000 and ip.data.data == b"pong"
    assert udp_checksum_ok(ip)
    assert h.flow(5000, "203.0.113.10", 7).established


def test_a_denied_destination_gets_admin_prohibited_quoting_the_datagram():
    h = Harness()
    sent = fb.udp(5000, 9999, b"secret", dst="203.0.113.20")
    h.dispatcher.frames_received([sent])
    assert h.sockets == []
    [frame] = h.link.take()
    ip = frame.data
    assert ip.p == 1 and ip.src == fb.ip4("203.0.113.20") and ip.dst == fb.ip4(fb.GUEST_IP)
    assert (ip.data.type, ip.data.code) == (3, 13)
    assert bytes(ip.data)[8:] == sent[14:14 + 28]       # IP header + 8 bytes
    assert ones_sum(bytes(ip.data)) == 0xFFFF
    assert h.nat.drops["udp-denied"] == 1


def test_policy_applies_to_real_addresses_too():
    h = Harness()
    h.guest_sends(5000, "192.0.2.1", 53, b"q")       # TEST-NET-1, denied by 0.0.0.0/0
    assert h.sockets == [] and h.nat.drops["udp-denied"] == 1
    [frame] = h.link.take()
    assert (frame.data.data.type, frame.data.data.code) == (3, 13)


def test_the_gateway_without_host_loopback_is_net_unreachable():
    h = Harness(host_loopback=False)
    h.guest_sends(5000, fb.GATEWAY_IP, 5353, b"q")
    [frame] = h.link.take()
    assert (frame.data.data.type, frame.data.data.code) == (3, 0)
    assert h.nat.drops["udp-no-route"] == 1


def test_local_services_win_over_routing():
    h = Harness(host_loopback=False)
    h.egress.add_local_service(fb.ip4(fb.GATEWAY_IP), 53, "127.0.0.1", 5353)
    h.guest_sends(5000, fb.GATEWAY_IP, 53, b"query")
    assert h.sockets[0].flow.target == ("127.0.0.1", 5353)


def test_a_host_icmp_error_becomes_the_guest_error():
    h = Harness()
    sent = fb.udp(5000, 9, b"anyone?", dst="203.0.113.10")
    h.dispatcher.frames_received([sent])
    h.nat.host_icmp_error(h.sockets[0].flow, 3, 3)
    [frame] = h.link.take()
    ip = frame.data
    assert ip.src == fb.ip4("203.0.113.10") and (ip.data.type, ip.data.code) == (3, 3)
    assert bytes(ip.data)[8:] == sent[14:14 + 28]
    h.nat.host_icmp_error(h.sockets[0].flow, 11, 0)
    [frame] = h.link.take()
    assert (frame.data.data.type, frame.data.data.code) == (11, 0)
    h.nat.host_icmp_error(h.sockets[0].flow, 3, 4, 1400)    # the host's own PMTU business
    assert h.link.take() == []


def test_flows_expire_on_one_timer():
    h = Harness()
    for port in range(5000, 5010):
        h.guest_sends(port, "203.0.113.10", 7, b"x")
    assert len(h.clock.getDelayedCalls()) == 1
    replied = h.flow(5000, "203.0.113.10", 7)
    h.clock.advance(30)
    for _ in range(50):
        h.guest_sends(5000, "203.0.113.10", 7, b"x")
    h.nat.host_datagram(replied, b"y")
    assert len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(30)                     # 60 s: the nine silent flows go
    assert len(h.nat.table) == 1
    assert sum(s.closed for s in h.sockets) == 9
    assert h.nat.counters["udp-flows-expired"] == 9
    h.clock.advance(149)
    assert len(h.nat.table) == 1
    h.clock.advance(1)                      # 180 s after the reply
    assert len(h.nat.table) == 0 and all(s.closed for s in h.sockets)
    assert h.clock.getDelayedCalls() == []
    h.guest_sends(5000, "203.0.113.10", 7, b"again")   # a new flow, a new socket
    assert len(h.sockets) == 11


def test_the_flow_cap_evicts_the_oldest_idle_flow():
    h = Harness(max_udp_flows=2)
    h.guest_sends(5000, "203.0.113.10", 7, b"a")
    h.clock.advance(1)
    h.guest_sends(5001, "203.0.113.10", 7, b"b")
    h.clock.advance(1)
    h.guest_sends(5000, "203.0.113.10", 7, b"a again")
    h.guest_sends(5002, "203.0.113.10", 7, b"c")
    assert [s.closed for s in h.sockets] == [False, True, False]
    assert h.nat.drops["udp-flow-evicted"] == 1
    assert h.flow(5001, "203.0.113.10", 7) is None


def test_port_zero_is_dropped():
    h = Harness()
    h.guest_sends(5000, "203.0.113.10", 0, b"x")
    assert h.sockets == [] and h.dispatcher.drops["udp-port-zero"] == 1


def test_stop_closes_every_host_socket():
    h = Harness()
    h.guest_sends(5000, "203.0.113.10", 7, b"x")
    h.guest_sends(5001, fb.GATEWAY_IP, 7, b"x")
    h.nat.stop()
    assert all(s.closed for s in h.sockets) and len(h.nat.table) == 0
    assert h.clock.getDelayedCalls() == []


def test_replies_bigger_than_the_mtu_are_fragmented():
    h = Harness(mtu=1500)
    h.guest_sends(5000, "203.0.113.10", 7, b"q")
    payload = bytes(range(256)) * 16                 # 4096 bytes
    h.nat.host_datagram(h.sockets[0].flow, payload)
    frames = h.link.take()
    assert len(frames) == 3
    pieces = []
    for i, frame in enumerate(frames):
        ip = frame.data
        assert ip.len <= 1500 and ip.src == fb.ip4("203.0.113.10")
        assert ones_sum(bytes(ip)[:20]) == 0xFFFF
        assert bool(ip.mf) == (i < 2)
        pieces.append((ip.offset * 8, bytes(ip)[20:ip.len]))
        assert ip.id == frames[0].data.id
    datagram = b"".join(p for _o, p in sorted(pieces))
    assert [o for o, _p in pieces] == [0, 1480, 2960]
    u = dpkt.udp.UDP(datagram)
    assert u.sport == 7 and u.dport == 5000 and u.data == payload


def test_ipv4_fragment_sizes():
    frags = fragment(b"\1\2\3\4", b"\5\6\7\x08", 17, b"z" * 1481, 1500, 9)
    assert [len(c) for _h, c in frags] == [1480, 1]
