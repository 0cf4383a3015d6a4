"""The TCP state machine, driven by hand-written segments and a fake clock."""

import heapq
import itertools
import random

import pytest

from arcbox_net.tcp.connection import (
    Closed, Established, GuestEndOfData, GuestReset, IllegalTransition, Refused, TcpConnection,
    TcpParams, TcpState, TimedOut, seq_diff, seq_le, seq_lt)
from arcbox_net.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment

M = 0xFFFFFFFF
LP = 443      # the port we impersonate
GP = 40000    # the guest's port
S = TcpState


class Guest:
    """Guest-side numbering: offsets from each side's first data byte."""

    def __init__(self, conn, giss):
        self.conn = conn
        self.giss = giss

    def seg(self, off=0, ack_off=0, flags=ACK, window=65535, payload=b"", **kw):
        return TcpSegment(GP, LP, (self.giss + 1 + off) & M,
                          (self.conn.iss + 1 + ack_off) & M, flags, window, payload, **kw)

    def send(self, off=0, ack_off=0, flags=ACK, window=65535, payload=b"", now=0.0):
        self.conn.segment_received(self.seg(off, ack_off, flags, window, payload), now)

    def ack_of(self, seg):
        """Our offset that ``seg`` (from the connection) acknowledges."""
        return seq_diff(seg.ack, self.giss + 1)

    def off_of(self, seg):
        return seq_diff(seg.seq, self.conn.iss + 1)


def held(params=TcpParams(), iss=1000, giss=5000, mss=1460, wscale=7, window=65535):
    syn = TcpSegment(GP, LP, giss, 0, SYN, window, mss=mss, wscale=wscale)
    return TcpConnection.from_guest_syn(syn, 0.0, iss, params)


def established(params=TcpParams(), iss=1000, giss=5000, mss=1460, wscale=7, window=65535):
    """A connection after a clean passive handshake, with outputs drained."""
    c = held(params, iss, giss, mss, wscale, window)
    c.accept(0.0)
    c.take_segments()
    g = Guest(c, giss)
    g.send(window=window)
    assert c.state is S.ESTABLISHED
    assert c.take_events() == [Established()]
    return c, g


def only(segments):
    assert len(segments) == 1, segments
    return segments[0]


# -- sequence arithmetic

def test_sequence_helpers_wrap():
    assert seq_lt(2**32 - 1, 0) and seq_lt(2**32 - 10, 5)
    assert not seq_lt(5, 2**32 - 10)
    assert seq_le(7, 7)
    assert seq_diff(3, 2**32 - 2) == 5
    assert seq_diff(2**32 - 2, 3) == -5


# -- handshake

def test_passive_handshake():
    c = held()
    assert c.state is S.HELD
    assert c.take_segments() == [] and c.next_deadline() is None
    c.segment_received(TcpSegment(GP, LP, 5000, 0, SYN, 65535, mss=1460, wscale=7), 0.1)
    assert c.take_segments() == []  # HELD ignores segments
    c.accept(0.5)
    synack = only(c.take_segments())
    assert (synack.src_port, synack.dst_port) == (LP, GP)
    assert synack.flags == SYN | ACK
    assert (synack.seq, synack.ack) == (1000, 5001)
    assert (synack.mss, synack.wscale) == (1460, 7)
    assert synack.window == 65535  # never scaled in a SYN
    assert c.state is S.SYN_RECEIVED and c.take_events() == []
    assert c.next_deadline() == pytest.approx(1.5)
    c.segment_received(TcpSegment(GP, LP, 5001, 1001, ACK, 65535), 0.6)
    assert c.state is S.ESTABLISHED
    assert c.take_events() == [Established()]
    c.flush(0.6)
    assert c.take_segments() == []  # the handshake ACK needs no answer
    assert c.next_deadline() is None


def test_reset_while_held_answers_the_syn_with_rst():
    """A refused host connect: the RST|ACK the host itself would have sent."""
    c = held()
    c.reset()
    rst = only(c.take_segments())
    assert rst.flags == RST | ACK and (rst.seq, rst.ack) == (0, 5001)
    assert c.state is S.CLOSED and c.is_closed
    assert c.take_events() == [Closed()]
    for again in (c.reset, lambda: c.reset(rst=False)):
        with pytest.raises(IllegalTransition):
            again()
    assert c.take_segments() == [] and c.take_events() == []


def test_reset_without_rst_drops_silently():
    c = held()
    c.reset(rst=False)
    assert c.take_segments() == [] and c.take_events() == [Closed()] and c.is_closed
    c, g = established()
    c.send(b"x")
    c.flush(0.0)
    c.take_segments()
    c.reset(rst=False)
    assert c.take_segments() == [] and c.take_events() == [Closed()]
    assert c.next_deadline() is None and c.send_buffered == 0


@pytest.mark.parametrize("bad", [dict(window_scale=15), dict(receive_window=100),
                                 dict(mss_limit=0), dict(rto_min=0), dict(rto_max=0.1)])
def test_params_are_checked(bad):
    with pytest.raises(ValueError):
        TcpParams(**bad)


def test_syn_options_mss_is_min_of_both():
    c = held(TcpParams(mss_limit=8960), mss=1200)
    c.accept(0.0)
    assert only(c.take_segments()).mss == 8960
    assert c.send_mss == 1200
    assert held(mss=None).send_mss == 536


def test_window_scaling_negotiated():
    c, g = established(wscale=2, window=1000)
    assert c.snd_wnd == 4000  # the guest's window, scaled
    c.send(b"x" * 10000)
    c.flush(1.0)
    assert [len(s.payload) for s in c.take_segments()] == [1460, 1460]  # no runt
    g.send(ack_off=0, payload=b"hi", window=1000, now=1.0)
    c.flush(1.0)
    ack = c.take_segments()[-1]
    assert ack.window == 262144 >> 7  # ours, scaled by our shift


def test_window_scaling_not_negotiated():
    c = held(wscale=None, window=20000)
    c.accept(0.0)
    synack = only(c.take_segments())
    assert synack.wscale is None and synack.window == 65535
    g = Guest(c, 5000)
    g.send(window=20000)
    assert c.snd_wnd == 20000
    g.send(payload=b"x" * 100)
    c.flush(0.0)
    assert only(c.take_segments()).window == 65535  # capped, unscaled


# -- guest to host

def test_in_order_data_one_ack_per_flush():
    c, g = established()
    data = bytes(range(256)) * 80
    for i in range(0, len(data), 1000):
        g.send(off=i, payload=data[i:i + 1000])
    assert c.take_segments() == []
    assert b"".join(c.take_received()) == data
    c.flush(0.1)
    ack = only(c.take_segments())
    assert g.ack_of(ack) == len(data) and ack.flags == ACK
    c.flush(0.2)
    assert c.take_segments() == []
    assert c.bytes_from_guest == len(data)


def test_out_of_order_is_buffered_and_dup_acked_at_once():
    c, g = established()
    g.send(off=2000, payload=b"c" * 1000)
    dup = only(c.take_segments())  # immediate, not at flush
    assert g.ack_of(dup) == 0
    g.send(off=1500, payload=b"b" * 1000)  # overlaps the held segment
    assert g.ack_of(only(c.take_segments())) == 0
    assert c.take_received() == []
    g.send(off=0, payload=b"a" * 1500)
    assert b"".join(c.take_received()) == b"a" * 1500 + b"b" * 500 + b"c" * 1000
    c.flush(0.0)
    assert g.ack_of(only(c.take_segments())) == 3000


def test_fin_ahead_of_a_gap_is_taken_when_the_gap_fills():
    c, g = established()
    g.send(off=100, flags=ACK | FIN, payload=b"b" * 100)
    assert g.ack_of(only(c.take_segments())) == 0  # dup ACK
    assert c.state is S.ESTABLISHED
    g.send(off=0, payload=b"a" * 100)
    assert c.take_events() == [GuestEndOfData()]
    assert c.state is S.CLOSE_WAIT
    c.flush(0.0)
    assert g.ack_of(only(c.take_segments())) == 201


def test_old_retransmitted_data_is_reacked():
    c, g = established()
    g.send(off=0, payload=b"a" * 1000)
    c.flush(0.0)
    c.take_segments()
    c.take_received()
    g.send(off=0, payload=b"a" * 1000)
    assert c.take_received() == []
    c.flush(0.0)
    assert g.ack_of(only(c.take_segments())) == 1000
    g.send(off=500, payload=b"a" * 500 + b"b" * 500)  # partly old
    assert b"".join(c.take_received()) == b"b" * 500


def test_pure_acks_are_never_answered():
    c, g = established()
    g.send()
    g.send(off=-5)  # stale
    g.send(off=10 ** 6)  # far out of window
    g.send(ack_off=50)  # acks data never sent
    c.flush(0.0)
    assert c.take_segments() == []


def test_data_beyond_the_window_is_trimmed():
    p = TcpParams(receive_window=4000)
    c, g = established(p, wscale=None)
    g.send(off=0, payload=b"x" * 5000)
    assert sum(map(len, c.take_received())) == 4000
    c.flush(0.0)
    ack = only(c.take_segments())
    assert g.ack_of(ack) == 4000
    g.send(off=9000, payload=b"y" * 10)  # wholly beyond: re-ACK only
    c.flush(0.0)
    assert g.ack_of(only(c.take_segments())) == 4000


# -- host to guest

def test_send_is_segmented_by_mss_and_limited_by_window():
    c, g = established(mss=1000, wscale=None, window=5500)
    c.send(b"x" * 3000)
    c.send(b"y" * 7000)
    assert c.take_segments() == []  # sent on flush: small writes coalesce
    c.flush(0.0)
    segs = c.take_segments()
    assert [len(s.payload) for s in segs] == [1000] * 5  # no 500-byte runt
    assert [g.off_of(s) for s in segs] == [0, 1000, 2000, 3000, 4000]
    assert [s.flags for s in segs] == [ACK] * 4 + [ACK | PSH]
    g.send(ack_off=3000, window=5500, now=0.1)
    c.flush(0.1)
    segs = c.take_segments()
    assert [g.off_of(s) for s in segs] == [5000, 6000, 7000]
    assert all(seq_le(s.seq + len(s.payload), c.snd_una + 5500) for s in segs)


def test_send_buffered_accounting():
    c, g = established(mss=1000)
    c.send(b"x" * 10000)
    assert c.send_buffered == 10000
    c.flush(0.0)
    c.take_segments()
    assert c.send_buffered == 10000  # in flight is still ours
    g.send(ack_off=3000, now=0.1)
    assert c.send_buffered == 7000
    g.send(ack_off=10000, now=0.2)
    assert c.send_buffered == 0 and c.bytes_to_guest == 10000


# -- retransmission

def test_retransmission_backoff_and_reset_after_good_ack():
    c = held()
    c.accept(0.0)
    c.take_segments()
    g = Guest(c, 5000)
    g.send(now=0.1)  # RTT sample 0.1: SRTT 0.1, RTTVAR 0.05, RTO 0.3
    c.send(b"a" * 100)
    c.flush(10.0)
    first = only(c.take_segments())
    assert c.next_deadline() == pytest.approx(10.3)
    c.on_timer(10.29)
    assert c.take_segments() == []
    gaps = []
    for _ in range(3):
        now = c.next_deadline()
        c.on_timer(now)
        again = only(c.take_segments())
        assert (again.seq, bytes(again.payload)) == (first.seq, b"a" * 100)
        gaps.append(c.next_deadline() - now)
    assert gaps == pytest.approx([0.6, 1.2, 2.4])
    g.send(ack_off=100, now=20.0)  # acks a resent segment: no sample (Karn)
    assert c.next_deadline() is None
    c.send(b"b" * 100)
    c.flush(20.0)
    assert c.next_deadline() == pytest.approx(20.3)  # backoff gone
    g.send(ack_off=200, now=20.1)  # a clean 0.1 s sample: RTTVAR 0.0375
    c.send(b"c" * 100)
    c.flush(20.1)
    assert c.next_deadline() == pytest.approx(20.1 + 0.25)


def test_rto_is_clamped():
    c, g = established(TcpParams(rto_min=0.5))  # the handshake took no time
    c.send(b"x")
    c.flush(0.0)
    assert c.next_deadline() == pytest.approx(0.5)
    c, g = established(TcpParams(rto_max=5.0))
    c.send(b"x")
    c.flush(0.0)
    for _ in range(10):
        c.on_timer(c.next_deadline())
    assert c.next_deadline() - c.created_at <= sum(min(0.2 * 2 ** i, 5.0) for i in range(11))


def test_give_up_after_max_retransmits():
    c, g = established(TcpParams(max_retransmits=3))
    c.send(b"a" * 100)
    c.flush(0.0)
    c.take_segments()
    resent = 0
    while not c.is_closed:
        c.on_timer(c.next_deadline())
        segs = c.take_segments()
        if c.is_closed:
            rst = only(segs)
        else:
            resent += len(segs)
    assert resent == 3
    assert rst.flags & RST
    assert c.take_events() == [GuestReset("timeout"), Closed()]
    assert c.next_deadline() is None


def test_fast_retransmit_on_third_duplicate_ack():
    c, g = established(mss=1000)
    c.send(b"z" * 5000)
    c.flush(0.0)
    c.take_segments()
    g.send(ack_off=1000, now=0.01)
    for i in range(2):
        g.send(ack_off=1000, now=0.02)
        assert c.take_segments() == []
    g.send(ack_off=1000, now=0.03)
    again = only(c.take_segments())
    assert g.off_of(again) == 1000 and len(again.payload) == 1000
    g.send(ack_off=1000, now=0.04)
    assert c.take_segments() == []  # once
    g.send(ack_off=1000, window=30000, now=0.05)  # a window update is no dup ACK
    g.send(ack_off=2000, window=30000, now=0.06)  # partial ACK: the next hole
    assert g.off_of(only(c.take_segments())) == 2000
    # Both resends are in /stats (NewReno's went uncounted before).
    assert c.counters["tcp-retransmits"] == 2 and c.counters["tcp-fast-recovery"] == 1


def test_zero_window_probes_then_resume():
    c, g = established(TcpParams(max_retransmits=2), mss=1000, wscale=None)
    c.send(b"a" * 1000)
    c.flush(0.0)
    c.take_segments()
    g.send(ack_off=1000, window=0, now=0.1)
    c.send(b"b" * 3000)
    c.flush(0.1)
    assert c.take_segments() == []
    assert c.next_deadline() is not None
    gaps = []
    for _ in range(6):  # more than max_retransmits: a live guest is probed forever
        now = c.next_deadline()
        c.on_timer(now)
        probe = only(c.take_segments())
        assert g.off_of(probe) == 1000 and bytes(probe.payload) == b"b"
        gaps.append(c.next_deadline() - now)
        g.send(ack_off=1000, window=0, now=now)
    assert not c.is_closed
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]
    g.send(ack_off=1000, window=65535, now=50.0)
    c.flush(50.0)
    segs = c.take_segments()
    assert g.off_of(segs[0]) == 1000
    assert sum(len(s.payload) for s in segs) == 3000


def test_unanswered_zero_window_probes_give_up():
    c, g = established(TcpParams(max_retransmits=2), wscale=None)
    g.send(window=0)
    c.send(b"a" * 10)
    c.flush(0.0)
    while not c.is_closed:
        c.on_timer(c.next_deadline())
    assert c.take_events() == [GuestReset("timeout"), Closed()]


# -- closing

def test_guest_closes_first():
    c, g = established()
    g.send(flags=ACK | FIN, payload=b"bye")
    assert b"".join(c.take_received()) == b"bye"
    assert c.take_events() == [GuestEndOfData()]
    assert c.state is S.CLOSE_WAIT
    c.flush(0.0)
    assert g.ack_of(only(c.take_segments())) == 4
    c.send(b"still talking")  # half-close: we may still send
    c.close(0.1)
    fin = only(c.take_segments())
    assert fin.flags == ACK | PSH | FIN and bytes(fin.payload) == b"still talking"
    assert c.state is S.LAST_ACK
    g.send(off=4, ack_off=14, now=0.2)
    assert c.state is S.CLOSED
    assert c.take_events() == [Closed()]


def test_host_closes_first_then_time_wait():
    c, g = established()
    c.close(1.0)
    fin = only(c.take_segments())
    assert fin.flags == ACK | FIN and g.off_of(fin) == 0
    assert c.state is S.FIN_WAIT_1
    g.send(ack_off=1, now=1.1)
    assert c.state is S.FIN_WAIT_2 and c.next_deadline() == pytest.approx(61.1)  # fin_wait2_timeout
    g.send(payload=b"more", ack_off=1, now=1.2)  # the guest still sends
    assert b"".join(c.take_received()) == b"more"
    g.send(off=4, ack_off=1, flags=ACK | FIN, now=1.3)
    assert c.state is S.TIME_WAIT
    assert c.take_events() == [GuestEndOfData()]
    c.flush(1.3)
    assert g.ack_of(only(c.take_segments())) == 5
    assert c.next_deadline() == pytest.approx(3.3)
    g.send(off=4, ack_off=1, flags=ACK | FIN, now=2.0)  # our ACK was lost
    c.flush(2.0)
    assert g.ack_of(only(c.take_segments())) == 5
    assert c.next_deadline() == pytest.approx(4.0)
    c.on_timer(4.0)
    assert c.state is S.CLOSED and c.take_events() == [Closed()]


def test_simultaneous_close():
    c, g = established()
    c.close(0.0)
    c.take_segments()
    g.send(flags=ACK | FIN, ack_off=0)  # crosses our FIN
    assert c.state is S.CLOSING
    c.flush(0.0)
    assert g.ack_of(only(c.take_segments())) == 1
    g.send(off=1, ack_off=1, now=0.1)
    assert c.state is S.TIME_WAIT
    c.on_timer(c.next_deadline())
    assert c.take_events() == [GuestEndOfData(), Closed()]


def test_fin_is_sent_after_pending_data():
    c, g = established(mss=1000, wscale=None, window=2000)
    c.send(b"d" * 5000)
    c.close(0.0)
    assert c.state is S.FIN_WAIT_1
    segs = c.take_segments()
    assert [len(s.payload) for s in segs] == [1000, 1000]
    assert not any(s.flags & FIN for s in segs)
    g.send(ack_off=2000, window=4000, now=0.1)
    c.flush(0.1)
    segs = c.take_segments()
    assert [len(s.payload) for s in segs] == [1000, 1000, 1000]
    assert segs[-1].flags == ACK | PSH | FIN
    g.send(ack_off=5001, window=4000, now=0.2)
    assert c.state is S.FIN_WAIT_2


def test_guest_fin_crossing_our_queued_fin():
    c, g = established(mss=1000, wscale=None, window=1000)
    c.send(b"d" * 3000)
    c.close(0.0)
    assert len(c.take_segments()) == 1
    g.send(flags=ACK | FIN, ack_off=1000, window=0)
    assert c.state is S.CLOSING
    c.flush(0.0)
    assert g.ack_of(only(c.take_segments())) == 1
    g.send(off=1, ack_off=1000, window=5000, now=0.1)
    c.flush(0.1)
    segs = c.take_segments()
    assert [len(s.payload) for s in segs] == [1000, 1000] and segs[-1].flags & FIN
    g.send(off=1, ack_off=3001, window=5000, now=0.2)
    assert c.state is S.TIME_WAIT


def test_fin_is_retransmitted_like_data():
    c, g = established()
    c.close(0.0)
    fin = only(c.take_segments())
    c.on_timer(c.next_deadline())
    again = only(c.take_segments())
    assert (again.seq, again.flags) == (fin.seq, ACK | FIN)


def test_close_during_handshake_takes_effect_when_established():
    c = held()
    c.send(b"early")
    c.close(0.0)
    with pytest.raises(IllegalTransition):
        c.close(0.0)  # remembered once is enough: twice is the caller's bug
    c.accept(0.0)
    c.take_segments()
    Guest(c, 5000).send()
    assert c.state is S.FIN_WAIT_1
    c.flush(0.0)
    seg = only(c.take_segments())
    assert bytes(seg.payload) == b"early" and seg.flags & FIN


def test_closed_is_emitted_once_whatever_the_path():
    c, g = established()
    c.close(0.0)
    g.send(flags=ACK | RST, ack_off=1)
    with pytest.raises(IllegalTransition):
        c.reset()
    with pytest.raises(IllegalTransition):
        c.close(0.0)
    c.on_timer(100.0)
    events = c.take_events()
    assert events.count(Closed()) == 1 and events == [GuestReset("rst"), Closed()]


def test_reset_sends_rst():
    c, g = established()
    c.send(b"x")
    c.reset()
    rst = only(c.take_segments())
    assert rst.flags & RST and rst.seq == c.snd_nxt
    assert c.take_events() == [Closed()]


# -- RST and SYN in synchronized states

def test_rst_in_window_resets():
    c, g = established()
    g.send(off=100, flags=RST)
    assert c.state is S.CLOSED
    assert c.take_events() == [GuestReset("rst"), Closed()]


def test_rst_out_of_window_is_ignored():
    c, g = established()
    g.send(off=-1, flags=RST)
    g.send(off=10 ** 7, flags=RST | ACK)
    assert c.state is S.ESTABLISHED and c.take_events() == []
    c.flush(0.0)
    assert c.take_segments() == []


def test_syn_in_synchronized_state_gets_a_challenge_ack():
    c, g = established()
    c.segment_received(TcpSegment(GP, LP, 123, 0, SYN, 65535, mss=1460), 0.0)
    ack = only(c.take_segments())
    assert ack.flags == ACK and g.ack_of(ack) == 0
    assert c.state is S.ESTABLISHED


def test_syn_received_rst_ack_is_not_completion():
    c = held()
    c.accept(0.0)
    c.take_segments()
    g = Guest(c, 5000)
    g.send(off=10 ** 7, flags=RST | ACK)  # out of window: ignored
    assert c.state is S.SYN_RECEIVED and c.take_events() == []
    g.send(flags=RST | ACK)
    assert c.state is S.CLOSED
    assert c.take_events() == [GuestReset("rst"), Closed()]


def test_syn_received_fin_ack_with_wrong_ack_is_not_completion():
    c = held()
    c.accept(0.0)
    c.take_segments()
    g = Guest(c, 5000)
    g.send(flags=ACK | FIN, ack_off=7)
    assert c.state is S.SYN_RECEIVED and c.take_events() == []
    rst = only(c.take_segments())
    assert rst.flags == RST and rst.seq == (c.iss + 8) & M


def test_syn_received_fin_ack_acking_our_syn_completes_then_half_closes():
    # RFC 793: the guest got our SYN-ACK (its ACK may have been lost) and shut down.
    c = held()
    c.accept(0.0)
    c.take_segments()
    Guest(c, 5000).send(flags=ACK | FIN)
    assert c.take_events() == [Established(), GuestEndOfData()]
    assert c.state is S.CLOSE_WAIT


def test_syn_received_resends_syn_ack_for_a_retransmitted_syn():
    c = held()
    c.accept(0.0)
    synack = only(c.take_segments())
    c.segment_received(TcpSegment(GP, LP, 5000, 0, SYN, 65535, mss=1460, wscale=7), 0.5)
    again = only(c.take_segments())
    assert (again.seq, again.ack, again.flags, again.wscale) == \
        (synack.seq, synack.ack, SYN | ACK, 7)


def test_syn_ack_retries_then_gives_up():
    c = held(TcpParams(syn_retries=2))
    c.accept(0.0)
    c.take_segments()
    times = []
    while not c.is_closed:
        now = c.next_deadline()
        times.append(now)
        c.on_timer(now)
    assert times == pytest.approx([1.0, 3.0, 7.0])
    segs = c.take_segments()
    assert [s.flags for s in segs] == [SYN | ACK, SYN | ACK, RST | ACK]
    assert c.take_events() == [GuestReset("timeout"), Closed()]


# -- active open

def active(params=TcpParams(), iss=7000):
    c = TcpConnection.open_to_guest(LP, GP, 0.0, iss, params)
    syn = only(c.take_segments())
    assert c.state is S.SYN_SENT
    assert (syn.flags, syn.seq, syn.mss, syn.wscale) == (SYN, iss, params.mss_limit, 7)
    return c


def test_active_open_syn_ack():
    c = active()
    c.send(b"hello")  # buffered until established
    c.segment_received(TcpSegment(GP, LP, 900, 7001, SYN | ACK, 1000, mss=1200, wscale=3),
                       0.05)
    ack = only(c.take_segments())
    assert (ack.flags, ack.seq, ack.ack) == (ACK, 7001, 901)
    assert c.state is S.ESTABLISHED and c.take_events() == [Established()]
    assert c.snd_wnd == 1000 and c.send_mss == 1200
    c.flush(0.05)
    assert bytes(only(c.take_segments()).payload) == b"hello"
    assert c.next_deadline() == pytest.approx(0.05 + 0.2)  # RTT sample from the SYN


def test_active_open_refused():
    c = active()
    c.segment_received(TcpSegment(GP, LP, 0, 9999, RST | ACK, 0), 0.0)  # wrong ack
    c.segment_received(TcpSegment(GP, LP, 0, 0, RST, 0), 0.0)  # no ACK
    assert c.state is S.SYN_SENT
    c.segment_received(TcpSegment(GP, LP, 0, 7001, RST | ACK, 0), 0.0)
    assert c.state is S.CLOSED
    assert c.take_events() == [Refused(), Closed()]


def test_active_open_times_out():
    c = active(TcpParams(syn_retries=3))
    c.segment_received(TcpSegment(GP, LP, 900, 7001, FIN | ACK, 1000), 0.1)  # no SYN
    assert c.state is S.SYN_SENT
    sent = 0
    while not c.is_closed:
        c.on_timer(c.next_deadline())
        sent += len(c.take_segments())
    assert sent == 3
    assert c.take_events() == [TimedOut(), Closed()]


# -- receive flow control

@pytest.mark.parametrize("wscale", [None, 7])
def test_receive_closed_decays_window_without_shrinking(wscale):
    p = TcpParams(receive_window=20000)
    c, g = established(p, wscale=wscale)
    shift = 0 if wscale is None else 7
    g.send(payload=b"x" * 10)
    c.flush(0.0)
    first = only(c.take_segments())
    shown = g.ack_of(first) + (first.window << shift)
    edge = max(20000, shown)  # the furthest offered, SYN-ACK included (guest offsets)
    assert edge - (1 << shift) < shown
    c.set_receive_open(False, 0.0)
    assert c.take_segments() == []
    off = 10
    windows = []
    while off < edge:
        n = min(1500, edge - off)
        g.send(off=off, payload=b"y" * n)
        off += n
        c.flush(0.0)
        ack = only(c.take_segments())
        assert g.ack_of(ack) == off  # everything up to the offered edge is taken
        shown = off + (ack.window << shift)
        assert edge - (1 << shift) < shown <= edge  # never beyond, never short by more
        windows.append(ack.window)
    assert windows == sorted(windows, reverse=True) and windows[-1] == 0
    received = sum(map(len, c.take_received()))
    assert received == edge
    g.send(off=off, payload=b"z" * 100)  # beyond: dropped
    assert c.take_received() == []
    c.set_receive_open(True, 1.0)
    update = only(c.take_segments())
    assert update.window << shift == 20000 >> shift << shift
    assert g.ack_of(update) == received


# -- after the end: the guest and the clock are harmless, host inputs are bugs

def test_guest_and_timer_inputs_after_close_are_ignored():
    c, g = established()
    c.reset()
    c.take_segments()
    c.take_events()
    c.flush(1.0)
    c.on_timer(99.0)
    c.set_receive_open(False, 1.0)
    c.set_receive_open(True, 1.0)
    g.send(payload=b"x")
    g.send(flags=ACK | FIN)
    g.send(flags=RST)
    c.flush(1.0)
    assert c.take_segments() == [] and c.take_events() == [] and c.send_buffered == 0


def test_host_inputs_after_close_raise_and_change_nothing():
    c, g = established()
    c.reset()
    c.take_segments()
    c.take_events()
    for call in (lambda: c.send(b"late"), lambda: c.close(1.0), lambda: c.accept(1.0),
                 c.reset, lambda: c.reset(rst=False)):
        with pytest.raises(IllegalTransition) as info:
            call()
        assert info.value.state is S.CLOSED
    assert c.state is S.CLOSED and c.take_segments() == [] and c.take_events() == []
    assert c.send_buffered == 0 and c.next_deadline() is None


def test_reset_for():
    assert TcpConnection.reset_for(TcpSegment(GP, LP, 1, 2, RST | ACK, 0)) is None
    r = TcpConnection.reset_for(TcpSegment(GP, LP, 10, 777, ACK | PSH, 100, b"abc"))
    assert (r.src_port, r.dst_port, r.seq, r.flags) == (LP, GP, 777, RST)
    r = TcpConnection.reset_for(TcpSegment(GP, LP, 2**32 - 1, 0, SYN, 100))
    assert (r.seq, r.ack, r.flags) == (0, 0, RST | ACK)
    r = TcpConnection.reset_for(TcpSegment(GP, LP, 50, 0, FIN, 100, b"ab"))
    assert (r.seq, r.ack, r.flags) == (0, 53, RST | ACK)


# -- a simulated guest over a lossy, reordering wire

class SimGuest:
    """A minimal guest TCP: go-back-N sender, reassembling receiver.

    Offsets count from each side's first data byte. The guest ACKs every
    segment that occupies sequence space and probes a zero window. With
    ``buffer`` set, its application reads in fits and starts: the window it
    offers is what is left of ``buffer`` (so it goes to zero), data past the
    offered edge is dropped, and it sends a window update when it reads.
    """

    MSS = 1460
    SHIFT = 2  # the guest's window scale

    def __init__(self, giss, data, rng, buffer=None, timestamps=False):
        self.giss = giss
        self.data = data
        self.rng = rng
        self.buffer = buffer
        #: RFC 7323 on the guest's side: its TSval clock (ms) and TS.Recent,
        #: updated only by segments the last ACK it sent covers.
        self.timestamps = timestamps
        self.now = 0.0
        self.ts_recent = 0
        self.last_ack_sent = 0
        self.unread = 0
        self.una = self.nxt = 0
        self.edge = 0  # right edge of the connection's window, as an offset
        self.peer_iss = None
        self.peer_shift = 0
        self.rcv = 0
        self.my_edge = 0  # the furthest edge we offered
        self.received = bytearray()
        self.ooo = {}
        self.peer_fin = None
        self.got_fin = False
        self.last_progress = 0.0
        self.out = []

    def syn(self):
        return TcpSegment(GP, LP, self.giss, 0, SYN, 65535, mss=self.MSS, wscale=self.SHIFT,
                          tsval=self._tsval())

    def _tsval(self):
        return (0x5A5A0000 + int(self.now * 1000)) & M if self.timestamps else None

    def _window(self):
        free = (65535 << self.SHIFT) if self.buffer is None else self.buffer - self.unread
        field = min(65535, max(0, free) >> self.SHIFT)
        self.my_edge = max(self.my_edge, self.rcv + (field << self.SHIFT))
        return field

    def _emit(self, off, flags=ACK, payload=b""):
        ack = (self.peer_iss + 1 + self.rcv + self.got_fin) & M
        self.last_ack_sent = self.rcv + self.got_fin
        self.out.append(TcpSegment(GP, LP, (self.giss + 1 + off) & M, ack, flags,
                                   self._window(), payload, tsval=self._tsval(),
                                   tsecr=self.ts_recent))

    def receive(self, seg, now):
        self.now = now
        if self.timestamps and not seg.flags & RST:
            # Every segment of ours carries the option, echoing a TSval we sent.
            assert seg.tsval is not None, seg
            assert not seg.flags & ACK or \
                0 <= seq_diff(self._tsval(), seg.tsecr) < 100_000, seg
        if seg.flags & SYN:  # the SYN-ACK
            self.ts_recent = seg.tsval or 0
            self.peer_iss = seg.seq
            self.peer_shift = seg.wscale or 0
            self.edge = seg.window
            self._emit(0)
            return
        if self.timestamps and seq_diff(seg.seq, self.peer_iss + 1) <= self.last_ack_sent \
                and seq_diff(seg.tsval, self.ts_recent) >= 0:
            self.ts_recent = seg.tsval
        a = seq_diff(seg.ack, self.giss + 1)
        if self.una <= a <= self.nxt:
            if a > self.una:
                self.una = a
                self.last_progress = now
            self.edge = max(self.edge, a + (seg.window << self.peer_shift))
        off = seq_diff(seg.seq, self.peer_iss + 1)
        payload = bytes(seg.payload)[:max(0, self.my_edge - off)]
        fin = seg.flags & FIN and len(payload) == len(seg.payload)
        if payload:
            self.ooo.setdefault(off, payload)
            while True:
                for o in sorted(self.ooo):
                    piece = self.ooo[o]
                    if o <= self.rcv:
                        del self.ooo[o]
                        new = piece[self.rcv - o:]
                        self.received += new
                        self.unread += len(new)
                        self.rcv = max(self.rcv, o + len(piece))
                        break
                else:
                    break
        if fin:
            self.peer_fin = off + len(payload)
        if self.peer_fin == self.rcv:
            self.got_fin = True
        if seg.seq_len:
            self._emit(self.nxt)

    def tick(self, now):
        self.now = now
        if self.unread and self.rng.random() < 0.05:  # the application reads
            closed = self._window() == 0
            self.unread = 0
            if closed:
                self._emit(self.nxt)  # window update
        total = len(self.data) + 1  # and the FIN
        if now - self.last_progress > 0.3:
            self.last_progress = now
            if self.una < self.nxt:
                self.nxt = self.una  # go back N
            elif self.nxt < len(self.data) and self.edge <= self.nxt:
                self._emit(self.nxt, ACK, self.data[self.nxt:self.nxt + 1])  # probe
                self.nxt += 1
        while self.nxt < total:
            if self.nxt < len(self.data):
                n = min(self.MSS, len(self.data) - self.nxt, self.edge - self.nxt)
                if n <= 0:
                    break
                self._emit(self.nxt, ACK | PSH, self.data[self.nxt:self.nxt + n])
                self.nxt += n
            else:
                self._emit(self.nxt, ACK | FIN)
                self.nxt += 1

    def take(self):
        out, self.out = self.out, []
        return out


def simulate(seed, up=200_000, down=200_000, loss=0.05, iss=None, giss=None,
             toggle_receive=False, guest_buffer=None, host_closes_last=False, params=None,
             timestamps=False):
    """Both byte streams through a lossy, reordering wire; checks they arrive intact."""
    rng = random.Random(seed)
    params = params or TcpParams(time_wait=0.5)
    iss = rng.getrandbits(32) if iss is None else iss
    giss = rng.getrandbits(32) if giss is None else giss
    to_guest_data = rng.randbytes(down)
    guest = SimGuest(giss, rng.randbytes(up), rng, guest_buffer, timestamps)
    conn = TcpConnection.from_guest_syn(guest.syn(), 0.0, iss, params)
    conn.accept(0.0)
    guest.receive(only(conn.take_segments()), 0.0)
    conn.segment_received(only(guest.take()), 0.0)

    order = itertools.count()
    wires = {"conn": [], "guest": []}

    def put(dest, segs, now):
        for s in segs:
            if rng.random() >= loss:
                heapq.heappush(wires[dest], (now + rng.uniform(0.0005, 0.01), next(order), s))

    def due(dest, now):
        wire = wires[dest]
        while wire and wire[0][0] <= now:
            yield heapq.heappop(wire)[2]

    received = bytearray()
    events = conn.take_events()
    fed = 0
    closed = False
    now = 0.0
    for _ in range(100_000):
        now += 0.001
        for s in due("conn", now):
            conn.segment_received(s, now)
        if fed < down and conn.send_buffered < params.send_buffer_limit:
            n = rng.randint(1, 30_000)
            conn.send(memoryview(to_guest_data)[fed:fed + n])
            fed = min(down, fed + n)
        elif fed == down and not closed and (not host_closes_last or GuestEndOfData() in events):
            conn.close(now)
            closed = True
        if toggle_receive and rng.random() < 0.01:
            conn.set_receive_open(rng.random() < 0.6, now)
        conn.flush(now)
        conn.on_timer(now)
        for b in conn.take_received():
            received += b
        events += conn.take_events()
        put("guest", conn.take_segments(), now)
        for s in due("guest", now):
            guest.receive(s, now)
        guest.tick(now)
        put("conn", guest.take(), now)
        if conn.is_closed and guest.got_fin:
            break
    assert bytes(received) == guest.data
    assert bytes(guest.received) == to_guest_data
    assert events[0] == Established() and events[-1] == Closed()
    assert events.count(GuestEndOfData()) == 1 and events.count(Closed()) == 1
    assert GuestReset() not in events and GuestReset("timeout") not in events
    assert conn.bytes_from_guest == up and conn.bytes_to_guest == down
    assert conn._ts_ok is (timestamps and params.timestamps)
    return conn


def test_wraparound_transfer_both_ways():
    conn = simulate(1, up=100_000, down=100_000, loss=0.0, iss=2**32 - 10, giss=2**32 - 10)
    assert seq_lt(2**32 - 10, conn.snd_una) and conn.snd_una < 2**32 - 10
    assert conn.rcv_nxt < 2**32 - 10


@pytest.mark.parametrize("seed", range(6))
def test_random_loss_and_reordering(seed):
    iss = [None, 2**32 - 50_000][seed % 2]
    simulate(seed, loss=0.08, iss=iss, giss=iss, host_closes_last=seed % 3 == 0)


@pytest.mark.parametrize("seed", range(4))
def test_random_loss_and_reordering_with_timestamps(seed):
    """Timestamps on both sides (the guest's TS.Recent by RFC 7323's rules):
    nothing the wire merely reorders is lost to PAWS, and resent segments
    give RTT samples."""
    conn = simulate(200 + seed, loss=0.08, timestamps=True, host_closes_last=seed % 2 == 0)
    assert conn.counters["tcp-rtt-from-timestamps"] > 0


@pytest.mark.parametrize("seed", range(4))
def test_random_with_flow_control_both_ways(seed):
    """Our receive side paused at random; the guest's reader stalls (zero windows)."""
    simulate(100 + seed, loss=0.03, toggle_receive=True, guest_buffer=40_000,
             host_closes_last=seed % 2 == 0,
             params=TcpParams(time_wait=0.5, receive_window=30_000, window_scale=2))


# -- fuzz

def _in_state(state, rng):
    """A connection brought to ``state`` by a regular exchange."""
    iss = rng.choice([1000, 2**32 - 3, rng.getrandbits(32)])
    giss = rng.choice([5000, 2**32 - 2, rng.getrandbits(32)])
    if state is S.SYN_SENT:
        return TcpConnection.open_to_guest(LP, GP, 0.0, iss, TcpParams()), giss
    c = held(iss=iss, giss=giss, wscale=rng.choice([None, 0, 7, 14]))
    if state is S.HELD:
        return c, giss
    if state is S.CLOSED:
        c.reset()
        return c, giss
    c.accept(0.0)
    if state is S.SYN_RECEIVED:
        return c, giss
    g = Guest(c, giss)
    g.send()
    c.send(b"q" * 3000)
    c.flush(0.0)
    if state in (S.CLOSE_WAIT, S.LAST_ACK):
        g.send(flags=ACK | FIN)
        if state is S.LAST_ACK:
            c.close(0.0)
    elif state in (S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.TIME_WAIT):
        c.close(0.0)
        if state is S.CLOSING:
            g.send(flags=ACK | FIN)
        elif state is not S.FIN_WAIT_1:
            g.send(ack_off=3001)
            if state is S.TIME_WAIT:
                g.send(flags=ACK | FIN, ack_off=3001)
    assert c.state is state
    return c, giss


def _random_segment(rng, c, giss):
    def near(base):
        return (base + rng.choice([0, 0, 1, -1, rng.randint(-70000, 70000),
                                   rng.getrandbits(32)])) & M
    seq = near(rng.choice([c.rcv_nxt, giss, giss + 1]))
    ack = near(rng.choice([c.snd_una, c.snd_nxt, c.iss]))
    flags = rng.getrandbits(6)
    payload = rng.randbytes(rng.choice([0, 0, 1, 100, 1460, 70000]))
    if rng.random() < 0.5:
        payload = memoryview(payload)
    return TcpSegment(GP, LP, seq, ack, flags, rng.getrandbits(16), payload,
                      rng.choice([None, 0, 1, 536, 65535]), rng.choice([None, 0, 3, 14]))


def _host_input(c, call):
    """A host-side call: allowed, or it raises IllegalTransition and changes nothing."""
    before = (c.state, c.send_buffered, c.snd_nxt, c.next_deadline())
    try:
        call()
    except IllegalTransition as e:
        assert e.state is c.state
        assert (c.state, c.send_buffered, c.snd_nxt, c.next_deadline()) == before
        assert c.take_segments() == [] and c.take_events() == []
        return False
    return True


@pytest.mark.parametrize("state", list(TcpState), ids=lambda s: s.name)
def test_fuzz_guest_input_never_raises(state):
    """Random guest segments, timers and host calls in every state.

    The guest and the clock can never cause an IllegalTransition; host calls
    the state does not allow raise without side effects.
    """
    rng = random.Random(state.name)
    now = 0.0
    c, giss = _in_state(state, rng)
    for i in range(5000):
        if i % 40 == 0:
            c, giss = _in_state(state, rng)
        c.segment_received(_random_segment(rng, c, giss), now)
        segs = c.take_segments()
        events = c.take_events()
        r = rng.random()
        if r < 0.3:
            c.flush(now)
        elif r < 0.4:
            now = max(now, c.next_deadline() or now)
            c.on_timer(now)
        elif r < 0.45:
            _host_input(c, lambda: c.send(b"s" * rng.randint(0, 5000)))
        elif r < 0.47:
            c.set_receive_open(rng.random() < 0.5, now)
        elif r < 0.48:
            _host_input(c, lambda: c.close(now))
        elif r < 0.485:
            _host_input(c, lambda: c.reset(rst=rng.random() < 0.7))
        now += rng.random() * 0.05
        for s in segs + c.take_segments():
            assert 0 <= s.seq <= M and 0 <= s.ack <= M and 0 <= s.window <= 65535
            assert len(s.payload) <= max(c.send_mss, 1)
            assert s.src_port == LP and s.dst_port == GP
        c.take_received()
        assert (events + c.take_events()).count(Closed()) <= 1
        assert c.send_buffered >= 0
        assert 0 <= seq_diff(c.snd_nxt, c.snd_una) <= c.send_buffered + 1 or \
            c.state in (S.HELD, S.SYN_SENT, S.SYN_RECEIVED, S.CLOSED)


# -- no delayed ACK: every batch that owes an ACK ends with it

def test_small_request_is_acked_at_the_end_of_its_batch():
    c, g = established()
    g.send(payload=b"GET /", now=1.0)
    c.flush(1.0)
    seg = only(c.take_segments())
    assert seg.flags == ACK and g.ack_of(seg) == 5 and not seg.payload
    assert c.take_received() == [b"GET /"] and c.next_deadline() is None


@pytest.mark.parametrize("what", ["two-segments", "fin", "out-of-order"])
def test_bulk_fin_and_out_of_order_are_acked_at_once(what):
    c, g = established()
    if what == "two-segments":
        g.send(payload=b"a" * 1460, now=1.0)
        g.send(off=1460, payload=b"b" * 1460, now=1.0)
    elif what == "fin":
        g.send(payload=b"bye", flags=ACK | FIN, now=1.0)
    else:
        g.send(off=100, payload=b"later", now=1.0)
    c.flush(1.0)
    assert [s for s in c.take_segments() if s.flags & ACK and not s.payload]


# -- the table: host inputs are checked, guest nonsense is answered

_HOST_OPEN = {S.HELD, S.SYN_SENT, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT}
_HOST_CALLS = {
    "accept": (lambda c: c.accept(0.0), lambda state: state is S.HELD),
    "send": (lambda c: c.send(b"more"), lambda state: state in _HOST_OPEN),
    "close": (lambda c: c.close(0.0), lambda state: state in _HOST_OPEN),
    "reset": (lambda c: c.reset(), lambda state: state is not S.CLOSED),
    "drop": (lambda c: c.reset(rst=False), lambda state: state is not S.CLOSED),
}


@pytest.mark.parametrize("call", sorted(_HOST_CALLS))
@pytest.mark.parametrize("state", list(TcpState), ids=lambda s: s.name)
def test_host_inputs_are_allowed_exactly_where_the_table_has_them(state, call):
    c, _giss = _in_state(state, random.Random(7))
    c.take_segments()
    c.take_events()
    do, allowed = _HOST_CALLS[call]
    assert _host_input(c, lambda: do(c)) == allowed(state)


@pytest.mark.parametrize("state", [S.ESTABLISHED, S.CLOSE_WAIT, S.LAST_ACK, S.FIN_WAIT_1,
                                   S.FIN_WAIT_2, S.CLOSING, S.TIME_WAIT],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("kind, answer", [
    ("ack-of-unsent", None),      # pure: dropped (never answered, no ACK war)
    ("stale-ack", None),          # pure, far behind: dropped
    ("old-data", "ack"),          # our ACK was lost: say it again
    ("duplicate-fin", "ack"),
    ("beyond-window", "ack"),
    ("data-without-ack", None),   # RFC 9293 3.10.7.4: no ACK bit, drop
    ("syn", "ack"),               # challenge ACK (RFC 5961 section 4)
    ("rst-outside-window", None),
])
def test_guest_nonsense_is_answered_as_tcp_says_never_illegal(state, kind, answer):
    c, giss = _in_state(state, random.Random(3))
    c.flush(0.0)
    c.take_segments()
    c.take_events()
    c.take_received()
    before = (c.state, c.rcv_nxt, c.snd_una, c.snd_nxt, c.send_buffered)
    rcv, nxt = c.rcv_nxt, c.snd_nxt
    seg = {
        "ack-of-unsent": TcpSegment(GP, LP, rcv, (nxt + 1000) & M, ACK, 65535),
        "stale-ack": TcpSegment(GP, LP, (rcv - 100_000) & M, c.snd_una, ACK, 65535),
        "old-data": TcpSegment(GP, LP, (rcv - 10) & M, c.snd_una, ACK, 65535, b"x" * 10),
        "duplicate-fin": TcpSegment(GP, LP, (rcv - 1) & M, c.snd_una, ACK | FIN, 65535),
        "beyond-window": TcpSegment(GP, LP, (rcv + 10 ** 6) & M, c.snd_una, ACK, 65535,
                                    b"y" * 100),
        "data-without-ack": TcpSegment(GP, LP, rcv, 0, PSH, 65535, b"z" * 100),
        "syn": TcpSegment(GP, LP, rcv, 0, SYN, 65535, mss=1460),
        "rst-outside-window": TcpSegment(GP, LP, (rcv + 10 ** 6) & M, 0, RST, 0),
    }[kind]
    c.segment_received(seg, 1.0)
    c.flush(1.0)
    segs = c.take_segments()
    if answer is None:
        assert segs == []
    else:
        ack = only(segs)
        assert ack.flags == ACK and not ack.payload and (ack.seq, ack.ack) == (nxt, rcv)
    assert (c.state, c.rcv_nxt, c.snd_una, c.snd_nxt, c.send_buffered) == before
    assert c.take_received() == [] and c.take_events() == []


@pytest.mark.parametrize("state", [S.HELD, S.CLOSED], ids=lambda s: s.name)
def test_guest_segments_in_held_and_closed_are_ignored(state):
    c, giss = _in_state(state, random.Random(5))
    c.take_segments()
    c.take_events()
    for flags in (SYN, ACK, ACK | FIN, RST, RST | ACK, SYN | ACK, PSH | ACK):
        c.segment_received(TcpSegment(GP, LP, (giss + 1) & M, c.iss + 1, flags, 65535,
                                      b"d" if flags & PSH else b""), 0.5)
    c.flush(0.5)
    assert c.state is state and c.take_segments() == [] and c.take_events() == []


def test_duplicate_fin_in_time_wait_restarts_its_timer():
    c, giss = _in_state(S.TIME_WAIT, random.Random(3))
    assert c.next_deadline() == pytest.approx(TcpParams().time_wait)
    c.segment_received(TcpSegment(GP, LP, (c.rcv_nxt - 1) & M, c.snd_una, ACK | FIN, 65535),
                       1.0)
    assert c.next_deadline() == pytest.approx(1.0 + TcpParams().time_wait)
    assert c.state is S.TIME_WAIT


def test_every_row_of_the_table_is_one_move():
    """The table is complete where the adapter may call and closed under CLOSED."""
    from arcbox_net.tcp.connection import _ROWS, _TRANSITIONS
    assert _TRANSITIONS[S.CLOSED] == {}
    assert all("reset" in _TRANSITIONS[s] for s in TcpState if s is not S.CLOSED)
    assert len(_ROWS) == sum(len(moves) for moves in _TRANSITIONS.values())
    # Events come from rows only; Closed comes from entering CLOSED, never from a row.
    assert all(not isinstance(event, Closed) for *_x, event in _ROWS)


# -- bounded work per guest input (issue 20, item 2)

def test_a_tiny_guest_mss_is_raised_to_the_floor():
    """MSS 1 in the SYN would cut a download into one-byte segments; 48 is the floor
    (Linux's tcp_min_snd_mss), and the MTU's limit still caps it from above."""
    from arcbox_net.tcp.connection import MIN_SND_MSS
    assert MIN_SND_MSS == 48
    for announced, expected in ((1, 48), (0, 536), (47, 48), (48, 48), (100, 100),
                                (9000, 1460)):
        c = held(mss=announced)
        assert c.send_mss == expected, announced
    c = held(params=TcpParams(mss_limit=40), mss=1)
    assert c.send_mss == 40  # never above what the link carries


def test_one_flush_emits_at_most_its_budget_and_asks_for_another_turn():
    """A 4 MB download to a guest with MSS 1 and a huge window: each flush sends
    at most burst_segments segments of 48 bytes; wants_flush until all is out."""
    params = TcpParams(burst_segments=100)
    c, g = established(params, mss=1, wscale=7, window=65535)  # 8 MiB window
    data = bytes(range(256)) * (4 << 12)  # 1 MiB: enough to show the budget
    c.send(data)
    got = bytearray()
    turns = 0
    c.flush(0.0)
    while True:
        out = c.take_segments()
        assert len(out) <= 100
        assert all(len(s.payload) <= 48 for s in out)
        got += b"".join(bytes(s.payload) for s in out)
        turns += 1
        if not c.wants_flush:
            break
        c.flush(0.0)
    assert bytes(got) == data
    assert turns == -(-len(data) // (48 * 100))
    # The guest's ACK of everything: nothing more to send, no further turn wanted.
    g.send(ack_off=len(data))
    c.flush(0.0)
    assert c.take_segments() == [] and not c.wants_flush


# -- timeouts for every state (issue 20, item 3)

def test_syn_ack_retries_are_bounded_by_default():
    """A SYN whose sender never completes the handshake (a spoofed flood) holds
    its host socket 15 s by default, not the 127 s of six doublings."""
    c = held()
    c.accept(0.0)
    times = []
    while not c.is_closed:
        now = c.next_deadline()
        times.append(now)
        c.on_timer(now)
    assert times == pytest.approx([1.0, 3.0, 7.0, 15.0])
    assert [s.flags for s in c.take_segments()] == [SYN | ACK] * 4 + [RST | ACK]
    assert c.take_events() == [GuestReset("timeout"), Closed()]


def _fin_wait_2(params=TcpParams()):
    c, g = established(params)
    c.close(1.0)
    fin = only(c.take_segments())
    assert fin.flags == ACK | FIN
    g.send(ack_off=1, now=1.0)
    assert c.state is S.FIN_WAIT_2
    return c, g


def test_fin_wait_2_times_out_without_guest_data():
    """The host closed, the guest acknowledged our FIN and never sends its own:
    after fin_wait2_timeout (60 s, Linux's tcp_fin_timeout) the connection is
    reset, so the host socket is not held for ever."""
    c, g = _fin_wait_2()
    assert c.next_deadline() == pytest.approx(61.0)
    c.on_timer(30.0)  # early: nothing
    assert c.state is S.FIN_WAIT_2 and c.take_segments() == []
    g.send(payload=b"still here", ack_off=1, now=40.0)  # guest data: the clock restarts
    c.flush(40.0)
    assert b"".join(c.take_received()) == b"still here"
    c.take_segments()
    assert c.next_deadline() == pytest.approx(100.0)
    g.send(ack_off=1, now=70.0)  # a pure ACK is no progress
    assert c.next_deadline() == pytest.approx(100.0)
    c.on_timer(100.0)
    rst = only(c.take_segments())
    assert rst.flags == RST | ACK and g.off_of(rst) == 1
    assert c.is_closed and c.take_events() == [GuestReset("idle"), Closed()]


def test_close_wait_times_out_without_host_data():
    """The guest closed; the host peer neither sends nor closes: reset after
    close_wait_timeout of host silence (host data restarts the clock)."""
    c, g = established(TcpParams(close_wait_timeout=100.0))
    g.send(flags=ACK | FIN, now=1.0)
    assert c.state is S.CLOSE_WAIT
    assert c.take_events() == [GuestEndOfData()]
    c.flush(1.0)
    c.take_segments()
    assert c.next_deadline() == pytest.approx(101.0)
    c.send(b"answer")
    c.flush(50.0)
    data = only(c.take_segments())
    assert data.payload == b"answer"
    # The retransmission timer is sooner; the idle deadline moved with the data.
    assert c.next_deadline() == pytest.approx(50.2)  # rto_min
    g.send(off=1, ack_off=6, now=50.1)
    assert c.next_deadline() == pytest.approx(150.0)
    c.on_timer(150.0)
    rst = only(c.take_segments())
    assert rst.flags == RST | ACK
    assert c.is_closed and c.take_events() == [GuestReset("idle"), Closed()]


def test_timeouts_are_checked():
    for bad in (dict(fin_wait2_timeout=0), dict(close_wait_timeout=-1)):
        with pytest.raises(ValueError):
            TcpParams(**bad)


# -- SACK (issue 20, item 1)

def sack_established(params=TcpParams(), window=65535, mss=1000):
    syn = TcpSegment(GP, LP, 5000, 0, SYN, window, mss=mss, wscale=7, sack=True)
    c = TcpConnection.from_guest_syn(syn, 0.0, 1000, params)
    c.accept(0.0)
    synack = only(c.take_segments())
    assert synack.sack is params.sack  # SACK permitted, as the guest offered
    g = Guest(c, 5000)
    g.send(window=window)
    c.take_events()
    return c, g


def test_out_of_order_guest_data_is_sacked():
    """Each early segment gets a duplicate ACK with SACK blocks, the block of
    the latest arrival first; once the hole fills, plain ACKs again."""
    c, g = sack_established()
    base = g.giss + 1
    g.send(off=1000, payload=b"b" * 1000)
    dup = only(c.take_segments())
    assert g.ack_of(dup) == 0 and dup.sack == ((base + 1000) & M, (base + 2000) & M)
    g.send(off=2000, payload=b"c" * 1000)  # right after: the same block grows
    assert only(c.take_segments()).sack == (base + 1000, base + 3000)
    g.send(off=5000, payload=b"e" * 1000)  # a second hole: the newest block first
    assert only(c.take_segments()).sack == (base + 5000, base + 6000, base + 1000, base + 3000)
    g.send(off=0, payload=b"a" * 1000)  # the first hole fills
    c.flush(0.0)
    ack = only(c.take_segments())
    assert g.ack_of(ack) == 3000 and ack.sack == (base + 5000, base + 6000)
    assert b"".join(bytes(d) for d in c.take_received()) == b"a" * 1000 + b"b" * 1000 + b"c" * 1000
    g.send(off=3000, payload=b"d" * 2000)
    c.flush(0.0)
    ack = only(c.take_segments())
    assert g.ack_of(ack) == 6000 and ack.sack is None
    assert c.counters["tcp-ooo-received"] == 3


def test_no_sack_blocks_unless_the_guest_offered_sack():
    c, g = established()
    g.send(off=1000, payload=b"b" * 100)
    assert only(c.take_segments()).sack is None
    c, g = sack_established(TcpParams(sack=False))
    g.send(off=1000, payload=b"b" * 100)
    assert only(c.take_segments()).sack is None


def test_sack_permitted_refused_when_disabled():
    syn = TcpSegment(GP, LP, 5000, 0, SYN, 65535, mss=1000, wscale=7, sack=True)
    c = TcpConnection.from_guest_syn(syn, 0.0, 1000, TcpParams(sack=False))
    c.accept(0.0)
    assert not only(c.take_segments()).sack
    syn = TcpSegment(GP, LP, 5000, 0, SYN, 65535, mss=1000, wscale=7)
    c = TcpConnection.from_guest_syn(syn, 0.0, 1000, TcpParams())
    c.accept(0.0)
    assert not only(c.take_segments()).sack


def _sent_offsets(c, g):
    return [(g.off_of(s), len(s.payload)) for s in c.take_segments() if s.payload]


def _sack_ack(c, g, ack_off, *blocks, now):
    base = c.iss + 1
    edges = tuple((base + x) & M for b in blocks for x in b)
    c.segment_received(g.seg(ack_off=ack_off, sack=edges or None), now)
    c.flush(now)
    return _sent_offsets(c, g)


def _overdue(c, g):
    """Run the reordering timer: what it resends."""
    deadline = c.next_deadline()
    c.on_timer(deadline)
    return _sent_offsets(c, g), deadline


def test_sack_recovery_resends_only_the_holes():
    """Ten segments out, the 2nd and the 5th lost: the guest's SACKs make us
    resend those two, and nothing it already has. A hole counts as lost once
    DupThresh segments are SACKed above it and it is overdue by the
    reordering wait (RACK): a quarter more than the round trip of the data
    SACKed."""
    c, g = sack_established()
    c.send(bytes(10000))
    c.flush(0.0)
    assert len(_sent_offsets(c, g)) == 10
    assert _sack_ack(c, g, 1000, now=0.01) == []  # the first segment arrived
    assert _sack_ack(c, g, 1000, (2000, 3000), now=0.01) == []   # 1 segment above the hole
    assert _sack_ack(c, g, 1000, (2000, 4000), now=0.01) == []   # 2
    assert _sack_ack(c, g, 1000, (5000, 6000), (2000, 4000), now=0.01) == []  # 3: but early
    assert c.counters["tcp-fast-recovery"] == 1
    resent, when = _overdue(c, g)
    assert resent == [(1000, 1000)] and when == pytest.approx(0.0125)
    assert _sack_ack(c, g, 1000, (5000, 7000), (2000, 4000), now=0.013) == []  # 2nd hole: 2 above
    assert _sack_ack(c, g, 1000, (5000, 8000), (2000, 4000), now=0.014) == []  # 3 above
    resent, when = _overdue(c, g)
    assert resent == [(4000, 1000)] and when == pytest.approx(0.0175)  # RTT now 14 ms
    assert _sack_ack(c, g, 1000, (5000, 10000), (2000, 4000), now=0.021) == []  # not twice
    # The resends arrive: all acknowledged, recovery over.
    c.segment_received(g.seg(ack_off=10000), 0.03)
    c.flush(0.03)
    assert c.snd_una == c.snd_nxt and c.counters["tcp-retransmits"] == 2
    assert c.next_deadline() is None


def test_reordering_alone_resends_nothing():
    """SACKs above a hole, then the hole's segment arrives late (reordered)
    before the reordering wait is over: nothing was resent."""
    c, g = sack_established()
    c.send(bytes(6000))
    c.flush(0.0)
    _sent_offsets(c, g)
    for right in (2000, 3000, 4000, 5000):
        assert _sack_ack(c, g, 0, (1000, right), now=0.004) == []
    assert c.next_deadline() == pytest.approx(0.005)
    assert _sack_ack(c, g, 5000, now=0.0045) == []  # the late segment: all is here
    c.on_timer(0.005)
    assert _sent_offsets(c, g) == [] and c.counters["tcp-retransmits"] == 0


def test_a_lost_resend_is_resent_once_later_data_is_sacked():
    """The resend of a hole is lost too: when data sent after it has been
    SACKed (DupThresh segments past the round), it is resent without an RTO."""
    c, g = sack_established()
    c.send(bytes(5000))
    c.flush(0.0)
    _sent_offsets(c, g)
    for right in (2000, 3000, 4000, 5000):
        assert _sack_ack(c, g, 0, (1000, right), now=0.01) == []
    assert _overdue(c, g)[0] == [(0, 1000)]
    c.send(bytes(4000))  # more data goes out after the resend
    c.flush(0.02)
    assert [o for o, _n in _sent_offsets(c, g)] == [5000, 6000, 7000, 8000]
    assert _sack_ack(c, g, 0, (1000, 7000), now=0.03) == []
    assert _sack_ack(c, g, 0, (1000, 8000), now=0.03) == [(0, 1000)]  # 3 past the round
    assert c.counters["tcp-lost-retransmit"] == 1 and c.counters["tcp-rto"] == 0


def test_probe_then_rto_with_a_scoreboard_resend_every_hole():
    """No ACK progress: the probe timeout (max(2 RTT, 10 ms)) resends every
    hole the scoreboard shows, the tail too, up to three times; if that
    brings nothing, the RTO does it again."""
    c, g = sack_established()
    c.send(bytes(6000))
    c.flush(0.0)
    _sent_offsets(c, g)
    base = c.iss + 1
    c.segment_received(g.seg(ack_off=0, sack=((base + 1000) & M, (base + 2000) & M,
                                              (base + 3000) & M, (base + 4000) & M)), 0.001)
    c.flush(0.001)
    assert _sent_offsets(c, g) == []  # 2 segments SACKed: not yet lost
    assert c.next_deadline() == pytest.approx(0.01)
    c.on_timer(0.01)
    holes = [(0, 1000), (2000, 1000), (4000, 1000), (5000, 1000)]
    assert _sent_offsets(c, g) == holes
    assert c.counters["tcp-probe"] == 1 and c.counters["tcp-rto"] == 0
    for due in (0.03, 0.07):  # two more probes, each waiting twice as long
        assert c.next_deadline() == pytest.approx(due)
        c.on_timer(due)
        assert _sent_offsets(c, g) == holes
    assert c.counters["tcp-probe"] == 3
    rto = c.next_deadline()
    assert rto == pytest.approx(0.2)  # then only the RTO is left
    c.on_timer(rto)
    assert _sent_offsets(c, g) == holes and c.counters["tcp-rto"] == 1
    # Progress re-arms the probe.
    c.segment_received(g.seg(ack_off=2000, sack=((base + 3000) & M, (base + 4000) & M)), 0.3)
    c.flush(0.3)
    assert c.next_deadline() == pytest.approx(0.31)


def test_duplicates_are_reported_with_d_sack():
    """A segment we already have (a needless resend of the guest's) is reported
    as the first SACK block (RFC 2883), so the guest's sender can undo its
    reaction and learn that the link reorders."""
    c, g = sack_established()
    base = g.giss + 1
    g.send(off=0, payload=b"a" * 1000)
    c.flush(0.0)
    assert only(c.take_segments()).sack is None
    g.send(off=0, payload=b"a" * 1000)  # again, wholly old
    c.flush(0.0)
    ack = only(c.take_segments())
    assert g.ack_of(ack) == 1000 and ack.sack == (base, base + 1000)
    g.send(off=2000, payload=b"c" * 500)  # held out of order
    assert only(c.take_segments()).sack == (base + 2000, base + 2500)
    g.send(off=2000, payload=b"c" * 500)  # and again: D-SACK, then the held block
    assert only(c.take_segments()).sack == (base + 2000, base + 2500, base + 2000, base + 2500)
    c.flush(0.0)
    assert c.take_segments() == []  # reported once


def test_the_guests_d_sacks_lengthen_the_reordering_wait():
    """A D-SACK (first block below snd_una, or inside the next) says a resend
    was needless: each one makes the wait a sixteenth of an RTT longer, up
    to two RTTs, so a link that reorders a lot stops drawing resends."""
    c, g = sack_established()
    c.send(bytes(8000))
    c.flush(0.0)
    _sent_offsets(c, g)
    base = c.iss + 1
    _sack_ack(c, g, 0, (1000, 2000), now=0.01)  # RTT of SACKed data: 10 ms
    assert c._reorder_wait() == pytest.approx(0.0125)
    _sack_ack(c, g, 2000, (0, 1000), now=0.011)  # below snd_una: D-SACK
    _sack_ack(c, g, 2000, (3000, 4000), (3000, 5000), now=0.012)  # inside the next: D-SACK
    assert c.counters["tcp-dsack-received"] == 2
    assert c._reo_factor == pytest.approx(1.375)
    for _ in range(40):
        _sack_ack(c, g, 2000, (0, 1000), now=0.013)
    assert c._reo_factor == 2.0
