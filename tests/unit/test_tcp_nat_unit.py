"""The TCP NAT adapter without a network: deferred SYN release and its failure mapping.

A MemoryReactorClock stands in for the reactor: host connects are recorded,
and the test decides whether they succeed, are refused or time out.
"""

import dpkt
import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from framebuild import FakeLink
import framebuild as fb
from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.policy import Egress
from arcbox_net.tcp.nat import TcpNat

REMOTE = "203.0.113.10"


@pytest.fixture
def nat():
    config = StackConfig(address_map=[f"{REMOTE}=127.0.0.2"], deny=["0.0.0.0/0"],
                         allow=["127.0.0.0/8"], max_connections=3)
    link = FakeLink()
    dispatcher = FrameDispatcher(config, link)
    dispatcher.guest_mac = fb.GUEST_MAC
    reactor = MemoryReactorClock()
    nat = TcpNat(dispatcher, config, Egress(config), reactor)
    dispatcher.register(nat)
    return nat


def guest(nat, *frames):
    nat.dispatcher.frames_received(list(frames))
    out = [fb.parse(f) for f in nat.dispatcher.link.sent]
    nat.dispatcher.link.sent.clear()
    return out


def syn(sport=40000, dport=80, seq=1000, dst=REMOTE):
    return fb.tcp(sport, dport, seq=seq, flags=dpkt.tcp.TH_SYN, dst=dst,
                  opts=b"\x02\x04\x05\xb4")


def connect_succeeds(nat, index=0):
    host, port, factory, _timeout, _bind = nat.reactor.tcpClients[index]
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    proto.makeConnection(transport)
    return transport


def connect_fails(nat, reason, index=0):
    connector = nat.reactor.connectors[index]
    nat.reactor.tcpClients[index][2].clientConnectionFailed(connector, Failure(reason))


def test_syn_is_held_until_the_host_connect_succeeds(nat):
    assert guest(nat, syn()) == []
    host, port = nat.reactor.tcpClients[0][:2]
    assert (host, port) == ("127.0.0.2", 80)
    # Retransmitted SYN (same ISN) while connecting: absorbed, no second connect.
    assert guest(nat, syn()) == []
    assert len(nat.reactor.tcpClients) == 1
    connect_succeeds(nat)
    synack = nat_sent(nat)
    assert synack.data.src == fb.ip4(REMOTE) and synack.data.dst == fb.ip4("10.0.2.2")
    t = synack.data.data
    assert t.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK and t.ack == 1001 and t.sport == 80


def nat_sent(nat):
    frames = [fb.parse(f) for f in nat.dispatcher.link.sent]
    nat.dispatcher.link.sent.clear()
    assert len(frames) == 1, frames
    return frames[0]


def test_new_isn_on_the_same_tuple_replaces_the_attempt(nat):
    guest(nat, syn(seq=1000))
    guest(nat, syn(seq=5000))
    assert len(nat.reactor.tcpClients) == 2
    assert nat.reactor.connectors[0].stoppedConnecting  # the first attempt was cancelled
    connect_succeeds(nat, 1)
    assert nat_sent(nat).data.data.ack == 5001


def test_concurrent_syns_to_one_port_are_independent(nat):
    guest(nat, syn(sport=40000), syn(sport=40001))
    assert len(nat.reactor.tcpClients) == 2
    assert len(nat.connections) == 2


def test_refused_becomes_rst_ack(nat):
    guest(nat, syn())
    connect_fails(nat, error.ConnectionRefusedError())
    t = nat_sent(nat).data.data
    assert t.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and t.ack == 1001
    assert nat.connections == {}


@pytest.mark.parametrize("reason, code", [
    (error.TimeoutError(), 1),
    (error.NoRouteError(), 0),
    (error.ConnectError(osError=113), 1),
])
def test_unreachable_and_timeout_become_icmp(nat, reason, code):
    guest(nat, syn())
    connect_fails(nat, reason)
    reply = nat_sent(nat)
    icmp = reply.data.data
    assert isinstance(icmp, dpkt.icmp.ICMP) and (icmp.type, icmp.code) == (3, code)
    assert reply.data.src == fb.ip4(REMOTE)
    quoted = dpkt.ip.IP(bytes(icmp.data)[4:])  # the SYN's header + 8 bytes
    assert quoted.dst == fb.ip4(REMOTE) and bytes(quoted)[20:22] == (40000).to_bytes(2, "big")
    assert nat.connections == {}


def test_denied_destination_is_admin_prohibited_without_a_connect(nat):
    [reply] = guest(nat, syn(dst="198.51.100.1"))
    icmp = reply.data.data
    assert (icmp.type, icmp.code) == (3, 13)
    assert nat.reactor.tcpClients == []


def test_gateway_goes_to_host_loopback(nat):
    guest(nat, syn(dst="10.0.2.1", dport=8080))
    assert nat.reactor.tcpClients[0][:2] == ("127.0.0.1", 8080)


def test_segments_of_no_connection_get_rst_and_rst_gets_nothing(nat):
    [reply] = guest(nat, fb.tcp(40000, 80, seq=5, ack=77, flags=dpkt.tcp.TH_ACK, dst=REMOTE,
                                payload=b"x"))
    t = reply.data.data
    assert t.flags == dpkt.tcp.TH_RST and t.seq == 77
    assert guest(nat, fb.tcp(40000, 80, seq=5, flags=dpkt.tcp.TH_RST, dst=REMOTE)) == []
    assert nat.drops["tcp-no-connection"] == 1 and nat.drops["tcp-unmatched-rst"] == 1


def test_connection_cap_resets_and_counts(nat):
    guest(nat, *(syn(sport=p) for p in (1, 2, 3)))
    [reply] = guest(nat, syn(sport=4))
    t = reply.data.data
    assert t.flags & dpkt.tcp.TH_RST and t.dport == 4
    assert nat.drops["tcp-connection-limit"] == 1 and len(nat.reactor.tcpClients) == 3


def test_data_both_ways_and_one_ack_per_batch(nat):
    guest(nat, syn())
    transport = connect_succeeds(nat)
    isn = nat_sent(nat).data.data.seq
    ack = dpkt.tcp.TH_ACK
    frames = [fb.tcp(40000, 80, seq=1001, ack=isn + 1, flags=ack, dst=REMOTE)]
    seq = 1001
    for i in range(5):
        frames.append(fb.tcp(40000, 80, seq=seq, ack=isn + 1, flags=ack, dst=REMOTE,
                             payload=bytes([65 + i]) * 1000))
        seq += 1000
    nat.dispatcher.frames_received(frames)
    acks = [fb.parse(f).data.data for f in nat.dispatcher.link.sent]
    nat.dispatcher.link.sent.clear()
    assert len(acks) == 1 and acks[0].ack == seq  # one cumulative ACK for the batch
    assert transport.value() == b"".join(bytes([65 + i]) * 1000 for i in range(5))
    splice = next(iter(nat.connections.values()))
    splice.dataReceived(b"reply" * 10)
    data = nat_sent(nat).data.data
    assert data.data == b"reply" * 10 and data.seq == isn + 1


def established(nat):
    """A guest connection through its handshake: (splice, host transport, our ISN)."""
    guest(nat, syn())
    transport = connect_succeeds(nat)
    isn = nat_sent(nat).data.data.seq
    guest(nat, fb.tcp(40000, 80, seq=1001, ack=isn + 1, flags=dpkt.tcp.TH_ACK, dst=REMOTE))
    splice = next(iter(nat.connections.values()))
    assert splice.conn.state.name == "ESTABLISHED"
    return splice, transport, isn


def test_host_reset_resets_the_guest_and_forgets(nat):
    splice, _transport, isn = established(nat)
    splice.connectionLost(Failure(error.ConnectionLost()))
    t = nat_sent(nat).data.data
    assert t.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and t.seq == isn + 1
    assert nat.connections == {} and nat.counters["tcp-host-reset"] == 1


def test_host_eof_then_connection_done_sends_one_fin(nat):
    """readConnectionLost closes our side; the connectionLost after it must not again."""
    splice, _transport, isn = established(nat)
    splice.readConnectionLost()
    fin = nat_sent(nat).data.data
    assert fin.flags & dpkt.tcp.TH_FIN and fin.seq == isn + 1
    splice.connectionLost(Failure(error.ConnectionDone()))
    assert nat.dispatcher.link.sent == [] and splice.conn.state.name == "FIN_WAIT_1"


def test_stop_drops_connections_without_a_word_to_the_guest(nat):
    splice, transport, _isn = established(nat)
    nat.stop()
    assert nat.dispatcher.link.sent == [] and splice.conn.is_closed
    assert nat.connections == {} and transport.disconnecting


def test_an_illegal_transition_is_a_counted_drop_not_a_crash(nat, monkeypatch):
    """Fault injection: the state machine raising (our bug) never reaches the dispatcher."""
    from arcbox_net.tcp.connection import IllegalTransition, TcpConnection, TcpState
    splice, transport, isn = established(nat)

    def broken(self, seg, now):
        raise IllegalTransition(self.state, "guest-fin")

    with monkeypatch.context() as m:
        m.setattr(TcpConnection, "segment_received", broken)
        assert guest(nat, fb.tcp(40000, 80, seq=1001, ack=isn + 1, flags=dpkt.tcp.TH_ACK,
                                 dst=REMOTE, payload=b"lost")) == []
    assert nat.drops["tcp-illegal-input"] == 1
    assert splice.conn.state is TcpState.ESTABLISHED
    # The connection carries on: the guest's retransmission goes through.
    [ack] = guest(nat, fb.tcp(40000, 80, seq=1001, ack=isn + 1, flags=dpkt.tcp.TH_ACK,
                              dst=REMOTE, payload=b"lost"))
    assert ack.data.data.ack == 1005 and transport.value() == b"lost"
