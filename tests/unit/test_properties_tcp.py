"""Properties of TcpConnection fed arbitrary guest segments, host events and
time: whatever the guest sends, nothing raises, the sequence state stays
ordered, the bytes each side gets are exactly the other side's stream in
order, every segment fits the send MSS and the window field, Closed comes
once, and a timer that fires moves its deadline on (the adapter re-arms at
``next_deadline``: a deadline left in the past is a busy loop)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from arcbox_net.tcp.connection import (
    Closed, IllegalTransition, TcpConnection, TcpParams, TcpState, seq_diff, seq_le)
from arcbox_net.wire.tcp import ACK, FIN, PSH, RST, SYN, URG, TcpSegment

M = 0xFFFFFFFF
LP, GP = 80, 40000
S = TcpState
HOST_SENDS = {S.HELD, S.SYN_SENT, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT}
HOST_CLOSES = HOST_SENDS


def guest_byte(offset):
    """The guest's stream: a byte per offset, any offset (old data included)."""
    return (offset * 7 + 3) & 0xFF


def host_bytes(start, n):
    return bytes((i * 13 + 5) & 0xFF for i in range(start, start + n))


def guest_bytes(start, n):
    return bytes(guest_byte(i) for i in range(start, start + n))


flags = st.sampled_from([ACK, ACK, ACK | PSH, ACK | FIN, ACK | FIN | PSH, RST, RST | ACK, SYN,
                         SYN | ACK, FIN, 0, ACK | URG, ACK | SYN | FIN | RST])
guest_step = st.tuples(
    st.just("guest"),
    st.integers(-3000, 9000),          # seq offset from rcv_nxt
    st.sampled_from([0, 0, 1, 10, 100, 536, 1460, 3000]),  # payload length
    flags,
    st.sampled_from([0, 1, 2, 3]),     # ack: all sent, snd_una, snd_una + k, anything
    st.integers(-3000, 70000),
    st.sampled_from([0, 1, 100, 512, 65535]),  # window field
    st.one_of(st.none(), st.lists(st.integers(-2000, 70000), min_size=2, max_size=8)),
    st.one_of(st.none(), st.integers(0, M)),   # tsval
)
host_step = st.one_of(
    st.tuples(st.just("send"), st.sampled_from([1, 100, 1460, 5000, 70000])),
    st.tuples(st.just("close")),
    st.tuples(st.just("pause")),
    st.tuples(st.just("resume")),
    st.tuples(st.just("time"), st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2, 1.0, 5.0, 61.0,
                                                 301.0])),
    st.tuples(st.just("flush")),
)
steps = st.lists(st.one_of(guest_step, guest_step, host_step), max_size=40)


class Run:
    """One connection and what it has said, checked after every input."""

    def __init__(self, conn, giss):
        self.c = conn
        self.giss = giss
        self.now = 0.0
        self.host_sent = 0       # host bytes handed to send()
        self.host_closed = False
        self.delivered = 0       # guest bytes handed over by take_received
        self.closed_events = 0
        self.synced = conn.state is not S.SYN_SENT

    def g_off(self, seq):
        return seq_diff(seq, self.giss + 1)

    def h_off(self, seq):
        return seq_diff(seq, self.c.iss + 1)

    def apply(self, step):
        c = self.c
        kind = step[0]
        if kind == "guest":
            _, rel, n, fl, ack_mode, k, window, sack, tsval = step
            seq = (c.rcv_nxt + rel) & M
            off = self.g_off(seq)
            ack = {0: c.snd_nxt, 1: c.snd_una, 2: (c.snd_una + k) & M,
                   3: (k * 2654435761) & M}[ack_mode]
            edges = None
            if sack is not None and not fl & SYN:
                edges = tuple((c.snd_una + e) & M for e in sack[:len(sack) // 2 * 2])
            seg = TcpSegment(GP, LP, seq, ack, fl, window, guest_bytes(off, n),
                             mss=536 if fl & SYN else None, sack=edges, tsval=tsval,
                             tsecr=tsval or 0)
            c.segment_received(seg, self.now)
        elif kind == "send":
            if not self.host_closed and c.state in HOST_SENDS:
                c.send(host_bytes(self.host_sent, step[1]))
                self.host_sent += step[1]
        elif kind == "close":
            if not self.host_closed and c.state in HOST_CLOSES:
                c.close(self.now)
                self.host_closed = True
        elif kind == "pause":
            c.set_receive_open(False, self.now)
        elif kind == "resume":
            c.set_receive_open(True, self.now)
        elif kind == "time":
            self.now += step[1]
            self.fire_timers()
        c.flush(self.now)
        self.check()

    def fire_timers(self):
        """As the adapter does: on_timer at each deadline that has passed."""
        c = self.c
        for _ in range(c.params.max_probes + 3):
            deadline = c.next_deadline()
            if deadline is None or deadline > self.now:
                return
            c.on_timer(self.now)
            self.check()
        deadline = c.next_deadline()
        assert deadline is None or deadline > self.now, \
            f"deadline {deadline} stays in the past at {self.now}: {c!r}"

    def check(self):
        c = self.c
        assert seq_le(c.snd_una, c.snd_nxt)
        # In flight: at most the host bytes, the SYN and the FIN.
        assert seq_diff(c.snd_nxt, c.snd_una) <= self.host_sent + 2
        assert seq_diff(c.snd_una, c.iss) >= 0
        for seg in c.take_segments():
            assert (seg.src_port, seg.dst_port) == (LP, GP)
            assert 0 <= seg.window <= 0xFFFF
            n = len(seg.payload)
            assert n <= c.send_mss
            if n:
                start = self.h_off(seg.seq) - 0  # offset of the first data byte (SYN is -1)
                assert 0 <= start and start + n <= self.host_sent
                assert bytes(seg.payload) == host_bytes(start, n)
            if seg.flags & FIN:
                fin_off = self.h_off(seg.seq) + n
                assert self.host_closed and fin_off == self.host_sent
            if seg.flags & SYN:
                assert seg.seq == c.iss
        for chunk in c.take_received():
            chunk = bytes(chunk)
            assert chunk == guest_bytes(self.delivered, len(chunk))
            self.delivered += len(chunk)
        for event in c.take_events():
            if isinstance(event, Closed):
                self.closed_events += 1
        assert self.closed_events == (1 if c.state is S.CLOSED else 0)
        if self.synced:  # the guest's ISN is known
            assert self.g_off(c.rcv_nxt) >= self.delivered


isns = st.sampled_from([0, 1000, M - 5, M - 3000, 0x7FFFFFFF])
syn_options = st.tuples(st.sampled_from([None, 1, 48, 536, 1460, 9000]),
                        st.sampled_from([None, 0, 7, 14]), st.booleans(),
                        st.one_of(st.none(), st.integers(0, M)))


@settings(max_examples=150, deadline=None)
@given(isns, isns, syn_options, st.booleans(), steps)
def test_passive_connection_under_arbitrary_segments(iss, giss, options, accept, script):
    mss, wscale, sack, tsval = options
    syn = TcpSegment(GP, LP, giss, 0, SYN, 65535, mss=mss, wscale=wscale, sack=sack or None,
                     tsval=tsval)
    c = TcpConnection.from_guest_syn(syn, 0.0, iss, TcpParams())
    assert 48 - 12 <= c.send_mss <= 1460  # 12: timestamps come out of the MSS
    run = Run(c, giss)
    if accept:
        c.accept(0.0)
        run.check()
    for step in script:
        run.apply(step)


@settings(max_examples=100, deadline=None)
@given(isns, steps)
def test_active_open_under_arbitrary_segments(iss, script):
    c = TcpConnection.open_to_guest(LP, GP, 0.0, iss, TcpParams())
    # The guest's ISN is whatever its SYN-ACK says: take the first one it sends.
    run = Run(c, 0)
    run.check()
    for step in script:
        if step[0] == "guest" and c.state is S.SYN_SENT and step[3] & SYN:
            giss = (step[5] * 40503) & M
            ack = c.snd_nxt if step[4] != 3 else (step[5] * 2654435761) & M
            c.segment_received(TcpSegment(GP, LP, giss, ack, step[3], step[6], b"",
                                          mss=536, tsval=step[8]), run.now)
            if c.state is not S.SYN_SENT and c.state is not S.CLOSED:
                run.giss, run.synced = giss, True
            c.flush(run.now)
            run.check()
            continue
        run.apply(step)


def test_illegal_host_inputs_raise_only_illegal_transition():
    """The documented exception, and only for the caller's own mistakes."""
    syn = TcpSegment(GP, LP, 5000, 0, SYN, 65535, mss=1460)
    c = TcpConnection.from_guest_syn(syn, 0.0, 1, TcpParams())
    c.accept(0.0)
    for call in (lambda: c.accept(0.0),):
        try:
            call()
        except IllegalTransition:
            pass
        else:
            raise AssertionError("accept twice was taken")
    c.close(0.0)
    for call in (lambda: c.close(0.0), lambda: c.send(b"x")):
        try:
            call()
        except IllegalTransition:
            continue
        raise AssertionError("close/send after close was taken")


def test_zero_window_with_data_in_flight_leaves_no_deadline_in_the_past():
    """Found by fuzz/fuzz_dispatch.py (a timer storm in FIN_WAIT_1): with SACK
    and an RTT sample, the guest shuts its window while our FIN is in flight.
    The probe timeout came due before the persist timer, but on_timer does not
    probe a zero window, so next_deadline stayed at the probe's time and the
    adapter re-armed with delay 0 in a loop (100 % CPU until the persist timer)."""
    syn = TcpSegment(GP, LP, 5000, 0, SYN, 65535, mss=1460, wscale=7, sack=True)
    c = TcpConnection.from_guest_syn(syn, 0.0, 1000, TcpParams())
    c.accept(0.0)
    c.segment_received(TcpSegment(GP, LP, 5001, 1001, ACK, 512), 0.05)
    c.close(0.1)
    c.segment_received(TcpSegment(GP, LP, 5001, 1001, ACK, 0), 0.12)  # FIN unacked, window 0
    c.flush(0.12)
    assert c.state is S.FIN_WAIT_1 and c.snd_wnd == 0
    now = 0.12
    for _ in range(12):
        deadline = c.next_deadline()
        now = max(now, deadline)
        c.on_timer(now)
        assert c.next_deadline() > now
