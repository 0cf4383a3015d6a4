"""TCP timestamps (RFC 7323) in the state machine: negotiation both ways, the
echo rules, RTT samples through retransmissions, PAWS, and the option bytes
taken out of every segment's payload. Driven with a fake ``now``."""

import pytest

from arcbox_net.tcp.connection import TcpConnection, TcpParams, TcpState
from arcbox_net.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment

M = 0xFFFFFFFF
LP = 443
GP = 40000
OFFSET = 7_000_000  # our TSval offset in these tests
GISS = 5000


def ts_of(now):
    """Our TSval at ``now``."""
    return (OFFSET + int(now * 1000)) & M


def only(segments):
    assert len(segments) == 1, segments
    return segments[0]


class Guest:
    def __init__(self, conn):
        self.conn = conn

    def seg(self, off=0, ack_off=0, flags=ACK, payload=b"", tsval=None, tsecr=0,
            window=65535, **kw):
        return TcpSegment(GP, LP, (GISS + 1 + off) & M, (self.conn.iss + 1 + ack_off) & M,
                          flags, window, payload, tsval=tsval, tsecr=tsecr, **kw)

    def send(self, now, off=0, ack_off=0, flags=ACK, payload=b"", tsval=None, tsecr=0, **kw):
        self.conn.segment_received(self.seg(off, ack_off, flags, payload, tsval, tsecr, **kw),
                                   now)


def established(params=TcpParams(), guest_tsval=100, mss=1460, sack=False):
    """A passive open whose guest SYN offered timestamps (unless ``guest_tsval`` is None)."""
    syn = TcpSegment(GP, LP, GISS, 0, SYN, 65535, mss=mss, wscale=7, sack=sack or None,
                     tsval=guest_tsval)
    c = TcpConnection.from_guest_syn(syn, 0.0, 1000, params, ts_offset=OFFSET)
    c.accept(0.0)
    synack = only(c.take_segments())
    g = Guest(c)
    g.send(0.001, tsval=None if guest_tsval is None else guest_tsval + 1,
           tsecr=synack.tsval or 0)
    assert c.state is TcpState.ESTABLISHED
    c.take_events()
    return c, g, synack


# -- negotiation

def test_passive_open_negotiates_when_the_guest_offers():
    c, g, synack = established()
    assert (synack.tsval, synack.tsecr) == (ts_of(0.0), 100)
    c.send(b"x" * 3000)
    c.flush(0.5)
    segs = c.take_segments()
    assert [(s.tsval, s.tsecr) for s in segs] == [(ts_of(0.5), 101)] * 3
    g.send(0.6, tsval=150, payload=b"hi")
    c.flush(0.6)
    ack = only(c.take_segments())
    assert (ack.tsval, ack.tsecr) == (ts_of(0.6), 150)


def test_active_open_negotiates_when_the_guest_answers():
    c = TcpConnection.open_to_guest(LP, GP, 2.0, 9000, TcpParams(), ts_offset=OFFSET)
    syn = only(c.take_segments())
    assert (syn.flags, syn.tsval, syn.tsecr) == (SYN, ts_of(2.0), 0)
    c.segment_received(TcpSegment(GP, LP, 700, 9001, SYN | ACK, 65535, mss=1460, wscale=7,
                                  tsval=4242, tsecr=syn.tsval), 2.003)
    assert c.state is TcpState.ESTABLISHED
    ack = only(c.take_segments())
    assert (ack.tsval, ack.tsecr) == (ts_of(2.003), 4242)
    assert c.send_mss == 1460 - 12


def test_active_open_without_the_guests_echo_sends_no_timestamps():
    c = TcpConnection.open_to_guest(LP, GP, 0.0, 9000, TcpParams(), ts_offset=OFFSET)
    assert only(c.take_segments()).tsval is not None
    c.segment_received(TcpSegment(GP, LP, 700, 9001, SYN | ACK, 65535, mss=1460, wscale=7),
                       0.01)
    assert only(c.take_segments()).tsval is None
    c.send(b"y" * 2000)
    c.flush(0.02)
    assert [s.tsval for s in c.take_segments()] == [None, None]
    assert c.send_mss == 1460


@pytest.mark.parametrize("params, guest_tsval", [(TcpParams(), None),
                                                 (TcpParams(timestamps=False), 100)])
def test_not_negotiated_unless_both_sides_want_them(params, guest_tsval):
    c, g, synack = established(params, guest_tsval)
    assert synack.tsval is None
    c.send(b"z" * 1460)
    c.flush(0.1)
    assert only(c.take_segments()).tsval is None and c.send_mss == 1460
    # A guest that sends timestamps anyway gets no PAWS and no echo.
    g.send(0.2, payload=b"a", tsval=1)
    g.send(0.2, off=1, payload=b"b", tsval=0)
    c.flush(0.2)
    assert b"".join(bytes(b) for b in c.take_received()) == b"ab"
    assert only(c.take_segments()).tsval is None


def test_tsval_never_goes_back_when_the_clock_does():
    c, g, _ = established()
    c.send(b"a")
    c.flush(5.0)
    assert only(c.take_segments()).tsval == ts_of(5.0)
    g.send(5.01, ack_off=1, tsval=200)
    c.send(b"b")
    c.flush(3.0)  # the wall clock stepped back
    assert only(c.take_segments()).tsval == ts_of(5.01)
    c.send(b"c")
    c.flush(5.5)
    assert only(c.take_segments()).tsval == ts_of(5.5)


# -- the echo (RFC 7323 4.3)

def test_the_echo_is_of_the_earliest_segment_the_ack_covers():
    c, g, _ = established()
    # A batch of three in-order segments: one ACK at the flush, echoing the first.
    for i, ts in enumerate((200, 201, 202)):
        g.send(0.1, off=100 * i, payload=b"d" * 100, tsval=ts)
    c.flush(0.1)
    assert only(c.take_segments()).tsecr == 200
    # Out of order: the duplicate ACK still echoes the last in-order segment.
    g.send(0.2, off=400, payload=b"e" * 100, tsval=210)
    assert only(c.take_segments()).tsecr == 200
    # The segment filling the hole sets it.
    g.send(0.3, off=300, payload=b"f" * 100, tsval=220)
    c.flush(0.3)
    ack = only(c.take_segments())
    assert ack.tsecr == 220 and ack.ack == (GISS + 1 + 500) & M


def test_sack_blocks_beside_timestamps_are_at_most_three():
    c, g, _ = established(sack=True)
    for i in range(5):  # five separate out-of-order pieces
        g.send(0.1, off=200 * (i + 1), payload=b"o" * 100, tsval=300 + i)
    dups = c.take_segments()
    assert len(dups[-1].sack) == 2 * 3 and dups[-1].tsval is not None


# -- RTT from the echo

def test_rtt_is_measured_through_a_retransmission():
    c, g, _ = established()
    c.send(b"r" * 1000)
    c.flush(1.0)
    first = only(c.take_segments())
    rto = c.next_deadline()
    c.on_timer(rto)  # lost: the RTO resends it
    resent = only(c.take_segments())
    assert resent.seq == first.seq and resent.tsval == ts_of(rto)
    # Karn's rule would take no sample; the echo names the resend: 30 ms.
    g.send(rto + 0.030, ack_off=1000, tsval=400, tsecr=resent.tsval)
    assert c.counters["tcp-rtt-from-timestamps"] == 1
    # One sample after the handshake's ~1 ms one: SRTT moved toward 30 ms.
    assert c._srtt == pytest.approx(0.875 * 0.001 + 0.125 * 0.030, abs=0.001)


def test_segments_never_resent_are_still_timed_exactly():
    c, g, _ = established()
    c.send(b"s" * 1000)
    c.flush(1.0)
    seg = only(c.take_segments())
    g.send(1.0004, ack_off=1000, tsval=400, tsecr=seg.tsval)
    assert c.counters["tcp-rtt-from-timestamps"] == 0
    assert c._srtt == pytest.approx(0.875 * 0.001 + 0.125 * 0.0004)


def test_an_echo_from_the_future_is_no_sample():
    c, g, _ = established()
    c.send(b"f" * 1000)
    c.flush(1.0)
    c.take_segments()
    c.on_timer(c.next_deadline())
    c.take_segments()
    srtt = c._srtt
    g.send(3.0, ack_off=1000, tsval=400, tsecr=ts_of(50.0))
    assert c.counters["tcp-rtt-from-timestamps"] == 0 and c._srtt == srtt


# -- PAWS (RFC 7323 5)

def test_paws_drops_an_old_segment_counts_it_and_acks():
    c, g, _ = established(TcpParams(paws_window=1))  # Linux's window
    g.send(0.1, payload=b"new", tsval=500)
    c.flush(0.1)
    c.take_segments()
    # Older than TS.Recent by two ticks: dropped, and answered with an ACK.
    g.send(0.2, off=3, payload=b"old", tsval=498)
    c.flush(0.2)
    ack = only(c.take_segments())
    assert ack.ack == (GISS + 1 + 3) & M and ack.tsecr == 500
    assert c.counters["tcp-paws-rejected"] == 1
    assert b"".join(bytes(b) for b in c.take_received()) == b"new"
    # One tick older is within the window: taken.
    g.send(0.3, off=3, payload=b"ok", tsval=499)
    c.flush(0.3)
    assert b"".join(bytes(b) for b in c.take_received()) == b"ok"
    # Across the 32-bit wrap, newer is newer.
    c2, g2, _ = established(TcpParams(paws_window=1), guest_tsval=M - 1)
    g2.send(0.1, payload=b"w", tsval=3)
    c2.flush(0.1)
    assert c2.counters["tcp-paws-rejected"] == 0 and c2.take_received()


def test_paws_window_by_default_lets_reordered_data_through():
    c, g, _ = established()
    g.send(0.1, off=100, payload=b"b" * 100, tsval=1000)  # out of order: no update
    g.send(0.1, payload=b"a" * 100, tsval=1003)            # in order: TS.Recent 1003
    g.send(0.1, off=200, payload=b"c" * 100, tsval=1001)   # sent before it, arrived after
    g.send(0.1, off=300, payload=b"d" * 100, tsval=1003 - 201)  # older than the window
    c.flush(0.1)
    assert b"".join(bytes(b) for b in c.take_received()) == b"a" * 100 + b"b" * 100 + \
        b"c" * 100
    assert c.counters["tcp-paws-rejected"] == 1


def test_paws_leaves_pure_acks_alone():
    """A reordered ACK may carry SACK blocks the later one does not: it is
    never dropped by PAWS (its ACK field is checked as always)."""
    c, g, _ = established(sack=True)
    c.send(b"p" * 4000)
    c.flush(1.0)
    segs = c.take_segments()
    base = segs[0].seq
    g.send(1.01, ack_off=1000, tsval=600, tsecr=segs[0].tsval,
           sack=((base + 2000) & M, (base + 3000) & M))
    g.send(1.01, ack_off=1000, tsval=590, tsecr=segs[0].tsval,  # older, more blocks
           sack=((base + 2000) & M, (base + 4000) & M))
    assert c.counters["tcp-paws-rejected"] == 0
    assert c._sacked == [[(base + 2000) & M, (base + 4000) & M]]
    # It does not set TS.Recent either: the echo stays the newer one.
    g.send(1.02, off=0, payload=b"x", tsval=601)
    c.flush(1.02)
    assert c.take_segments()[-1].tsecr == 601


def test_paws_lets_an_rst_through():
    c, g, _ = established()
    g.send(0.1, payload=b"x", tsval=700)
    g.send(0.2, off=1, flags=RST, tsval=1)
    assert c.state is TcpState.CLOSED


def test_paws_stops_holding_after_24_days_idle():
    c, g, _ = established(TcpParams(paws_window=1))
    g.send(0.1, payload=b"x", tsval=900)
    c.flush(0.1)
    c.take_received()
    c.take_segments()
    later = 0.1 + 25 * 86400
    g.send(later, off=1, payload=b"y", tsval=5)
    c.flush(later)
    assert c.counters["tcp-paws-rejected"] == 0
    assert b"".join(bytes(b) for b in c.take_received()) == b"y"
    ack = only(c.take_segments())
    assert ack.tsecr == 5 and ack.tsval == ts_of(later)  # our clock moved on too


# -- the 12 option bytes come out of the payload

def test_segments_leave_room_for_the_option():
    c, _g, _ = established(mss=1000)
    assert c.send_mss == 988
    c.send(b"m" * 5000)
    c.flush(0.1)
    assert [len(s.payload) for s in c.take_segments()] == [988] * 5 + [60]


@pytest.mark.parametrize("mss", [1460, 32757, 65495])
def test_gso_segments_stay_inside_the_ip_length(mss):
    """The GSO frame repeats the option in its header: its payload must leave
    room for it (a guest MSS of 32757 would otherwise make a 65542-byte packet)."""
    params = TcpParams(mss_limit=65495, segment_size=65495, receive_window=1 << 20)
    c, _g, _ = established(params, mss=mss)
    c.send(b"g" * 300_000)
    c.flush(0.1)
    segs = c.take_segments()
    assert segs
    for s in segs:
        assert 20 + 20 + 12 + len(s.payload) <= 65535
        assert len(s.payload) % c.send_mss == 0 or s is segs[-1]


def test_fin_and_window_updates_carry_timestamps():
    c, _g, _ = established()
    c.set_receive_open(False, 0.2)
    c.set_receive_open(True, 0.3)
    assert only(c.take_segments()).tsval == ts_of(0.3)
    c.close(0.4)
    fin = only(c.take_segments())
    assert fin.flags & FIN and fin.tsval == ts_of(0.4)
    assert not fin.flags & PSH


def test_paws_rejected_old_duplicate_is_d_sacked():
    c, g, _ = established(sack=True)
    g.send(0.1, payload=b"a" * 100, tsval=500)
    c.flush(0.1)
    c.take_segments()
    g.send(0.2, payload=b"a" * 100, tsval=100)  # a copy from long before
    c.flush(0.2)
    ack = only(c.take_segments())
    assert ack.sack == ((GISS + 1) & M, (GISS + 101) & M)
    assert c.counters["tcp-paws-rejected"] == 1


def test_a_coarser_tick():
    c, g, synack = established(TcpParams(ts_tick=0.004))
    assert synack.tsval == OFFSET
    c.send(b"t" * 100)
    c.flush(0.0101)
    seg = only(c.take_segments())
    assert seg.tsval == OFFSET + 2  # 10.1 ms is the third 4 ms tick
    rto = c.next_deadline()
    c.on_timer(rto)
    resent = only(c.take_segments())
    g.send(rto + 0.002, ack_off=100, tsval=300, tsecr=resent.tsval)
    # The sample runs from the start of the resend's tick: at most 4 ms over.
    sample = (c._srtt - 0.875 * 0.001) / 0.125
    assert 0.002 <= sample <= 0.006
