"""The neighbour table and source validation: frames to the guest go to the MAC
that owns the destination address; a second MAC (a probe, a spoofer) cannot
redirect another address's traffic, and spoofed sources go nowhere."""

import dpkt
import pytest
from twisted.internet import task
from twisted.logger import globalLogPublisher
from zope.interface import implementer

import framebuild as fb
from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.interfaces import IIPv4Handler
from arcbox_net.protocols.arp import ArpHandler
from arcbox_net.protocols.dhcp import DhcpHandler

from .test_dhcp import D, client_msg

MAC_A = fb.GUEST_MAC
MAC_B = b"\x02\x66\x66\x66\x66\x66"
REMOTE = fb.ip4("203.0.113.10")


@implementer(IIPv4Handler)
class UdpRecorder:
    ip_protocol = 17

    def __init__(self):
        self.seen = []

    def handle_ipv4(self, frame, ip):
        self.seen.append((bytes(frame[6:12]), bytes(ip.src)))


class Net:
    def __init__(self, **config):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.link = fb.FakeLink()
        self.config = StackConfig(**config)
        self.dispatcher = FrameDispatcher(self.config, self.link, clock=self.clock.seconds)
        self.dispatcher.register(ArpHandler(self.dispatcher))
        self.dhcp = DhcpHandler(self.dispatcher, self.config, self.clock.seconds)
        self.dispatcher.register(self.dhcp)
        self.udp = UdpRecorder()
        self.dispatcher.register(self.udp)
        self.framer = self.dispatcher.framer

    def send(self, *frames):
        self.dispatcher.frames_received(list(frames))

    def dhcp_msg(self, mac, mtype, **kw):
        return fb.udp(68, 67, client_msg(mtype, mac, **kw), src="0.0.0.0",
                      dst="255.255.255.255", dst_mac=b"\xff" * 6)

    def lease(self, mac):
        """DISCOVER/REQUEST from ``mac``; its address."""
        self.send(self.dhcp_msg(mac, D.DHCPDISCOVER))
        offer = self.link.take()[-1]
        address = dpkt.dhcp.DHCP(offer.data.data.data).yiaddr.to_bytes(4, "big")
        self.send(self.dhcp_msg(mac, D.DHCPREQUEST, requested=".".join(map(str, address)),
                                server_id="10.0.2.1"))
        ack = dpkt.dhcp.DHCP(self.link.take()[-1].data.data.data)
        assert ack.opts[0] == (53, bytes([D.DHCPACK]))
        return address

    def to_guest(self, dst, payload=b"data"):
        """A UDP packet from the outside to ``dst``; the frames that left."""
        self.framer.send_udp(REMOTE, dst, 53, 4000, payload)
        return self.link.take()


def from_guest(mac, src, payload=b"x"):
    frame = bytearray(fb.udp(4000, 53, payload, src=src, dst="203.0.113.10"))
    frame[6:12] = mac
    return bytes(frame)


def test_an_arp_probe_from_a_second_mac_does_not_take_the_guests_traffic():
    net = Net()
    addr_a = net.lease(MAC_A)
    net.send(from_guest(MAC_A, ".".join(map(str, addr_a))))
    # An ARP probe (sender 0.0.0.0) and a spoofed claim from MAC B.
    net.send(fb.arp_request(target="10.0.2.1", sender="0.0.0.0", mac=MAC_B),
             fb.arp_request(target="10.0.2.1", sender="10.0.2.2", mac=MAC_B))
    net.link.take()
    (frame,) = net.to_guest(addr_a)
    assert frame.dst == MAC_A
    assert net.dispatcher.neighbours.counters["neighbour-moved"] == 0
    assert net.dispatcher.framer.neighbours.macs == {addr_a: MAC_A}


def test_two_macs_with_leases_each_get_their_own_traffic():
    net = Net()
    addr_a, addr_b = net.lease(MAC_A), net.lease(MAC_B)
    assert addr_a != addr_b
    assert [f.dst for f in net.to_guest(addr_a)] == [MAC_A]
    assert [f.dst for f in net.to_guest(addr_b)] == [MAC_B]


def test_frames_with_a_source_not_their_macs_are_dropped_and_counted():
    net = Net()
    addr_a = net.lease(MAC_A)
    spoofs = [from_guest(MAC_B, ".".join(map(str, addr_a))),   # A's address from B
              from_guest(MAC_A, "10.0.2.99"),                  # never leased
              from_guest(MAC_A, "192.0.2.44"),                 # outside the subnet
              from_guest(MAC_A, "10.0.2.1"),                   # the gateway's
              from_guest(MAC_A, "0.0.0.0")]                    # not DHCP
    net.send(*spoofs)
    assert net.udp.seen == []
    assert net.dispatcher.drops["spoofed-source"] == 5
    net.send(from_guest(MAC_A, ".".join(map(str, addr_a))))
    assert net.udp.seen == [(MAC_A, addr_a)]


def test_allow_any_source_turns_validation_off():
    net = Net(allow_any_source=True)
    net.send(from_guest(MAC_A, "10.0.2.99"), from_guest(MAC_B, "192.0.2.44"))
    assert net.udp.seen == [(MAC_A, fb.ip4("10.0.2.99")), (MAC_B, fb.ip4("192.0.2.44"))]
    assert [f.dst for f in net.to_guest(fb.ip4("10.0.2.99"))] == [MAC_A]


def test_the_configured_address_is_claimed_by_the_first_mac_without_dhcp():
    net = Net()
    net.send(from_guest(MAC_A, "10.0.2.2"), from_guest(MAC_B, "10.0.2.2"))
    assert net.udp.seen == [(MAC_A, fb.ip4("10.0.2.2"))]
    assert net.dispatcher.drops["spoofed-source"] == 1
    # The claim lapses once A has been silent for the table's TTL.
    net.clock.advance(net.dispatcher.neighbours.ttl + 11)
    net.send(from_guest(MAC_B, "10.0.2.2"))
    net.send(from_guest(MAC_B, "10.0.2.2"))
    assert net.udp.seen[-1] == (MAC_B, fb.ip4("10.0.2.2"))


def test_a_request_for_an_address_never_offered_to_the_mac_gets_a_nak():
    net = Net()
    net.send(net.dhcp_msg(MAC_B, D.DHCPREQUEST, requested="10.0.2.2"))
    (nak,) = net.link.take()
    assert dpkt.dhcp.DHCP(nak.data.data.data).opts[0] == (53, bytes([D.DHCPNAK]))
    assert net.dhcp.core.leases() == []


def test_packets_to_an_unknown_address_wait_for_its_arp_reply():
    net = Net()
    addr_a = net.lease(MAC_A)
    net.dispatcher.neighbours.forget(addr_a)      # as if the entry had aged out
    for i in range(100):
        assert net.to_guest(addr_a, b"%d" % i) == [] or i == 0
    sent = net.link.sent
    assert sent == []
    framer = net.framer
    assert framer.unresolved() == {addr_a: framer.unresolved_per_address}
    assert framer.drops["unresolved-queue-full"] == 100 - framer.unresolved_per_address
    reply = dpkt.arp.ARP(hrd=1, pro=0x0800, hln=6, pln=4, op=dpkt.arp.ARP_OP_REPLY,
                         sha=MAC_A, spa=addr_a, tha=fb.GATEWAY_MAC, tpa=fb.ip4("10.0.2.1"))
    net.send(fb.ethernet(reply, 0x0806, src=MAC_A))
    out = net.link.take()
    assert len(out) == framer.unresolved_per_address
    assert {f.dst for f in out} == {MAC_A}
    assert framer.unresolved() == {}


def test_the_arp_request_for_an_unknown_address_asks_for_that_address():
    net = Net()
    addr_b = net.lease(MAC_B)
    net.dispatcher.neighbours.forget(addr_b)
    framer = net.framer
    framer.send_udp(REMOTE, addr_b, 53, 4000, b"q")
    (request,) = net.link.take()
    assert request.dst == b"\xff" * 6 and request.data.op == dpkt.arp.ARP_OP_REQUEST
    assert request.data.tpa == addr_b
    # Held packets are bounded in total and by address count, too.
    for i in range(200):
        framer.send_udp(REMOTE, fb.ip4(f"10.0.2.{i + 3}"), 53, 4000, b"q")
    assert len(framer.unresolved()) <= framer.unresolved_addresses
    assert sum(framer.unresolved().values()) <= framer.unresolved_limit
    # A packet off the subnet is never held.
    framer.send_udp(REMOTE, fb.ip4("192.0.2.1"), 53, 4000, b"q")
    assert framer.drops["no-neighbour-off-subnet"] == 1


@pytest.fixture
def log_events():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_100k_frames_from_changing_macs_make_a_handful_of_log_lines(log_events):
    """Each frame from a new MAC, all claiming the guest's address."""
    net = Net()
    net.send(from_guest(MAC_A, "10.0.2.2"))
    frames = [from_guest(b"\x02" + i.to_bytes(5, "big"), "10.0.2.2") for i in range(1, 100001)]
    for start in range(0, len(frames), 1000):
        net.send(*frames[start:start + 1000])
        net.clock.advance(0.01)                    # 100k frames in 1 s of clock
    ours = [e for e in log_events if e.get("log_namespace", "").startswith("arcbox_net")]
    assert net.dispatcher.drops["spoofed-source"] == 100000
    assert len(ours) <= 10
    assert net.dispatcher.limited_log.suppressed >= 100000 - 10
    assert [f.dst for f in net.to_guest(fb.ip4("10.0.2.2"))] == [MAC_A]


def test_a_queue_workers_table_takes_the_main_tables_lease_bindings():
    main, worker = Net(), Net()
    addr_b = main.lease(MAC_B)
    now = worker.clock.seconds()
    worker.dispatcher.neighbours.replace_bindings(
        main.dispatcher.neighbours.bindings(main.clock.seconds()), now)
    worker.send(from_guest(MAC_B, ".".join(map(str, addr_b))),
                from_guest(MAC_A, ".".join(map(str, addr_b))))
    assert worker.udp.seen == [(MAC_B, addr_b)]
    assert worker.dispatcher.drops["spoofed-source"] == 1


def test_a_renewal_of_an_unknown_lease_reaches_dhcp_and_gets_a_nak():
    """After a restart the guest renews from an address this stack never
    leased: the frame is not NATed or learned, but DHCP answers it."""
    net = Net()
    renew = fb.udp(68, 67, client_msg(D.DHCPREQUEST, MAC_B, ciaddr="10.0.2.9"),
                   src="10.0.2.9", dst="10.0.2.1")
    frame = bytearray(renew)
    frame[6:12] = MAC_B
    net.send(bytes(frame))
    (nak,) = net.link.take()
    assert dpkt.dhcp.DHCP(nak.data.data.data).opts[0] == (53, bytes([D.DHCPNAK]))
    assert net.dispatcher.neighbours.macs == {}
