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


# -- bounded work per guest input (issue 20, item 2)

def _established_with(nat, sport, mss_option, win=65535, wscale=7):
    """A handshake with the guest's own SYN options; returns (splice, transport, isn)."""
    opts = mss_option + bytes([1, 3, 3, wscale])
    guest(nat, fb.tcp(sport, 80, seq=1000, flags=dpkt.tcp.TH_SYN, dst=REMOTE, opts=opts))
    transport = connect_succeeds(nat, len(nat.reactor.tcpClients) - 1)
    isn = nat_sent(nat).data.data.seq
    guest(nat, fb.tcp(sport, 80, seq=1001, ack=isn + 1, flags=dpkt.tcp.TH_ACK, dst=REMOTE,
                      win=win))
    splice = nat.connections[(fb.ip4("10.0.2.2"), sport, fb.ip4(REMOTE), 80)]
    return splice, transport, isn


def test_mss_1_download_is_cut_at_the_floor_and_shares_the_reactor(nat):
    """A guest announcing MSS 1 with an 8 MiB window: host data leaves in 48-byte
    segments, at most one budget per reactor turn, and another connection's data
    goes out on the first turn all the same."""
    hog, _t1, _ = _established_with(nat, 40001, b"\x02\x04\x00\x01")
    other, _t2, other_isn = _established_with(nat, 40002, b"\x02\x04\x05\xb4")
    budget = nat.params.burst_segments
    hog.dataReceived(b"h" * (1 << 20))
    other.dataReceived(b"o" * 1000)
    frames = [fb.parse(f) for f in nat.dispatcher.link.sent]
    nat.dispatcher.link.sent.clear()
    hog_frames = [f for f in frames if f.data.data.dport == 40001]
    assert len(hog_frames) == budget
    assert all(len(f.data.data.data) == 48 for f in hog_frames)
    [o] = [f.data.data for f in frames if f.data.data.dport == 40002]
    assert o.data == b"o" * 1000 and o.seq == other_isn + 1
    assert nat.counters["tcp-flush-deferred"] >= 1
    turns = 1
    sent = len(hog_frames) * 48
    while nat._backlog_call is not None:
        # One reactor turn: the call the budget left, due at once (Clock.advance
        # would run the calls it schedules too, as if they were one turn).
        call = nat._backlog_call
        assert call.active() and call.getTime() == nat.reactor.seconds()
        call.cancel()
        nat._flush_backlog()
        batch = [fb.parse(f) for f in nat.dispatcher.link.sent]
        nat.dispatcher.link.sent.clear()
        assert 0 < len(batch) <= budget
        sent += sum(len(f.data.data.data) for f in batch)
        turns += 1
    # The guest's window (8 MiB) holds all of it: only the budget spread it out.
    assert sent == 1 << 20 and turns == -(-(1 << 20) // (48 * budget))


def test_no_tcp_frame_is_larger_than_the_link_takes():
    """The link's largest plain frame is below the configured MTU: the MSS
    follows the link, and every frame of a download fits it."""
    from arcbox_net.interfaces import LinkCapabilities

    class SmallLink(FakeLink):
        capabilities = LinkCapabilities(max_frame=14 + 1000)

    config = StackConfig(address_map=[f"{REMOTE}=127.0.0.2"], deny=["0.0.0.0/0"],
                         allow=["127.0.0.0/8"])
    dispatcher = FrameDispatcher(config, SmallLink())
    dispatcher.guest_mac = fb.GUEST_MAC
    nat = TcpNat(dispatcher, config, Egress(config), MemoryReactorClock())
    dispatcher.register(nat)
    splice, _transport, _isn = _established_with(nat, 40003, b"\x02\x04\x05\xb4")
    assert splice.conn.send_mss == 960
    splice.dataReceived(b"x" * 200000)
    sizes = [len(f) for f in nat.dispatcher.link.sent]
    assert sizes and max(sizes) <= 1014


# -- caps and timeouts (issue 20, item 3)

def _nat(**config):
    config = StackConfig(address_map=[f"{REMOTE}=127.0.0.2"], deny=["0.0.0.0/0"],
                         allow=["127.0.0.0/8"], **config)
    dispatcher = FrameDispatcher(config, FakeLink())
    dispatcher.guest_mac = fb.GUEST_MAC
    nat = TcpNat(dispatcher, config, Egress(config), MemoryReactorClock())
    dispatcher.register(nat)
    return nat


def test_half_open_cap_resets_new_syns_while_established_ones_work():
    """A SYN flood fills the half-open slots (host connects pending); further
    SYNs get RST without a host connect; an established connection carries on,
    and a slot freed by a completed handshake takes a new SYN."""
    nat = _nat(max_half_open=2, max_connections=100)
    splice, transport, isn = _established_with(nat, 40010, b"\x02\x04\x05\xb4")
    assert nat.half_open == 0
    guest(nat, syn(sport=1), syn(sport=2))
    assert nat.half_open == 2 and len(nat.reactor.tcpClients) == 3
    [reply] = guest(nat, syn(sport=3))
    assert reply.data.data.flags & dpkt.tcp.TH_RST and reply.data.data.dport == 3
    assert nat.drops["tcp-half-open-limit"] == 1 and len(nat.reactor.tcpClients) == 3
    # The established connection still moves data both ways.
    [ack] = guest(nat, fb.tcp(40010, 80, seq=1001, ack=isn + 1, flags=dpkt.tcp.TH_ACK,
                              dst=REMOTE, payload=b"hello"))
    assert transport.value() == b"hello" and ack.data.data.ack == 1006
    # The host refuses one pending connect: its slot is free again.
    connect_fails(nat, error.ConnectionRefusedError(), index=1)
    assert nat.half_open == 1
    guest(nat, syn(sport=4))
    assert nat.half_open == 2 and len(nat.reactor.tcpClients) == 4
    # A handshake completing frees a slot too.
    connect_succeeds(nat, index=2)
    synack = [f for f in nat.dispatcher.link.take() if f.data.data.dport == 2][0].data.data
    guest(nat, fb.tcp(2, 80, seq=1001, ack=synack.seq + 1, flags=dpkt.tcp.TH_ACK, dst=REMOTE))
    assert nat.half_open == 1
    nat.stop()
    assert nat.half_open == 0


def test_fin_wait_2_timeout_reaches_the_adapter():
    """The host closed; the guest acknowledged and went quiet: after
    --tcp-fin-timeout the guest gets RST, the host socket is aborted, the
    connection is forgotten and counted."""
    nat = _nat(tcp_fin_timeout=5.0)
    splice, transport, isn = _established_with(nat, 40011, b"\x02\x04\x05\xb4")
    splice.readConnectionLost()
    fin = nat_sent(nat).data.data
    assert fin.flags & dpkt.tcp.TH_FIN
    guest(nat, fb.tcp(40011, 80, seq=1001, ack=isn + 2, flags=dpkt.tcp.TH_ACK, dst=REMOTE))
    assert splice.conn.state.name == "FIN_WAIT_2"
    nat.reactor.advance(4.9)
    assert nat.connections and nat.dispatcher.link.sent == []
    nat.reactor.advance(0.2)
    rst = nat_sent(nat).data.data
    assert rst.flags & dpkt.tcp.TH_RST
    assert nat.connections == {} and nat.counters["tcp-idle-timeout"] == 1
    assert transport.disconnecting or transport.disconnected


# -- SACK on the wire (issue 20, item 1)

def test_sack_permitted_and_sack_blocks_on_the_wire(nat):
    """A guest SYN offering SACK gets SACK-permitted in the SYN-ACK; its
    out-of-order data is answered with a duplicate ACK carrying the block."""
    opts = b"\x02\x04\x05\xb4" + b"\x01\x03\x03\x07" + b"\x01\x01\x04\x02"
    guest(nat, fb.tcp(40020, 80, seq=1000, flags=dpkt.tcp.TH_SYN, dst=REMOTE, opts=opts))
    connect_succeeds(nat)
    synack = nat_sent(nat).data.data
    assert (dpkt.tcp.TCP_OPT_SACKOK, b"") in dpkt.tcp.parse_opts(synack.opts)
    isn = synack.seq
    ack = dpkt.tcp.TH_ACK
    guest(nat, fb.tcp(40020, 80, seq=1001, ack=isn + 1, flags=ack, dst=REMOTE))
    [dup] = guest(nat, fb.tcp(40020, 80, seq=2001, ack=isn + 1, flags=ack, dst=REMOTE,
                              payload=b"z" * 500))
    t = dup.data.data
    assert t.ack == 1001 and len(dup) <= 1514
    sack = dict(dpkt.tcp.parse_opts(t.opts))[dpkt.tcp.TCP_OPT_SACK]
    assert sack == (2001).to_bytes(4, "big") + (2501).to_bytes(4, "big")


# -- timestamps on the wire (issue 20, item 1)

def test_timestamps_on_the_wire(nat):
    """A guest SYN offering timestamps gets them in the SYN-ACK, echoing its
    TSval; every later segment carries them, and data leaves room for them."""
    ts_opt = b"\x04\x02\x08\x0a" + (777).to_bytes(4, "big") + bytes(4)
    opts = b"\x02\x04\x05\xb4" + ts_opt + b"\x01\x03\x03\x07"
    guest(nat, fb.tcp(40030, 80, seq=1000, flags=dpkt.tcp.TH_SYN, dst=REMOTE, opts=opts))
    transport = connect_succeeds(nat)
    synack = nat_sent(nat).data.data
    ts = dict(dpkt.tcp.parse_opts(synack.opts))[dpkt.tcp.TCP_OPT_TIMESTAMP]
    assert ts[4:] == (777).to_bytes(4, "big")
    tsval = int.from_bytes(ts[:4], "big")
    isn = synack.seq
    echo = b"\x01\x01\x08\x0a" + (778).to_bytes(4, "big") + tsval.to_bytes(4, "big")
    guest(nat, fb.tcp(40030, 80, seq=1001, ack=isn + 1, flags=dpkt.tcp.TH_ACK, dst=REMOTE,
                      opts=echo))
    splice = nat.connections[(fb.ip4("10.0.2.2"), 40030, fb.ip4(REMOTE), 80)]
    assert transport is splice.transport
    splice.dataReceived(b"d" * 3000)
    frames = [fb.parse(f) for f in nat.dispatcher.link.sent]
    nat.dispatcher.link.sent.clear()
    assert [len(f.data.data.data) for f in frames] == [1448, 1448, 104]
    for f in frames:
        assert len(f) <= 1514
        ts = dict(dpkt.tcp.parse_opts(f.data.data.opts))[dpkt.tcp.TCP_OPT_TIMESTAMP]
        assert ts[4:] == (778).to_bytes(4, "big")


def test_no_timestamps_unless_the_guest_offers_them(nat):
    guest(nat, syn(sport=40031))
    connect_succeeds(nat)
    synack = nat_sent(nat).data.data
    assert dpkt.tcp.TCP_OPT_TIMESTAMP not in dict(dpkt.tcp.parse_opts(synack.opts))


def test_no_tcp_timestamps_refuses_them():
    """--no-tcp-timestamps: a guest SYN offering them gets a SYN-ACK without,
    for both families and the forwards' SYNs alike."""
    nat = _nat(tcp_timestamps=False)
    assert not (nat.params.timestamps or nat.params6.timestamps
                or nat.inbound_params.timestamps)
    opts = b"\x02\x04\x05\xb4" + b"\x01\x01\x08\x0a" + bytes(8)
    guest(nat, fb.tcp(40032, 80, seq=1000, flags=dpkt.tcp.TH_SYN, dst=REMOTE, opts=opts))
    connect_succeeds(nat)
    synack = nat_sent(nat).data.data
    assert dpkt.tcp.TCP_OPT_TIMESTAMP not in dict(dpkt.tcp.parse_opts(synack.opts))
