"""Theory of operation: one guest TCP connection, sans I/O.

The guest opens TCP connections to anywhere; for each one the stack plays the
remote endpoint. This module is that endpoint's TCP, and nothing else: it
never touches a socket, a clock or a frame. The adapter (a separate module)
feeds it guest segments, host-side happenings and the time, and carries out
what it asks for. Everything here is synchronous and deterministic, so tests
drive it with a fake ``now``.

Inputs and outputs
------------------
Inputs, by who drives them:

- the guest: ``segment_received`` for every segment of this 4-tuple, then
  ``flush`` once at the end of the batch of frames (a batch is one read
  wakeup of the link);
- the host side: ``accept`` (the host connect succeeded), ``send`` (bytes
  read from the host socket), ``close`` (host EOF), ``reset`` (the one way
  to end a connection at once: with an RST to the guest for a refused
  connect, a host reset or a host socket gone; without one to drop it
  silently), ``set_receive_open`` (host transport paused or resumed); after
  ``send`` the adapter calls ``flush`` too;
- the clock: ``on_timer`` once ``next_deadline`` has passed.

Whatever the guest sends is legal input: nonsense (a stray or stale ACK, a
duplicate FIN, a segment outside the window, a SYN in a synchronized state)
gets the answer RFC 9293 gives it (an ACK, a challenge ACK, an RST, or a
silent drop) and never raises. The host-side inputs are the caller's
promises: ``accept`` twice, ``close`` twice, ``send`` after ``close`` or
``reset`` once CLOSED raise ``IllegalTransition`` (a bug in the adapter, as
h11's LocalProtocolError is one in its user). ``flush``, ``on_timer`` and
``set_receive_open`` are fine in any state.

Outputs are queued and collected by the adapter after each input:
``take_segments`` (to encode and send to the guest, in order),
``take_received`` (guest bytes to write to the host, in order) and
``take_events`` (Established, GuestEndOfData, GuestReset, Refused, TimedOut,
Closed; each comes from the transition that produces it, see below).
Collect received data before events: data always precedes the
GuestEndOfData of the FIN that follows it.

States
------
::

    passive open (guest connects out):
      HELD --accept--> SYN_RECEIVED --ACK of our SYN--> ESTABLISHED
      HELD --reset--> CLOSED (RST|ACK for a refused connect)
    active open (port forwarding, we connect to the guest):
      SYN_SENT --SYN-ACK--> ESTABLISHED        (RST: Refused; silence: TimedOut)
    guest closes first:
      ESTABLISHED --guest FIN--> CLOSE_WAIT --close--> LAST_ACK --ACK--> CLOSED
    host closes first:
      ESTABLISHED --close--> FIN_WAIT_1 --ACK--> FIN_WAIT_2 --guest FIN--> TIME_WAIT
      FIN_WAIT_1 --guest FIN--> CLOSING --ACK--> TIME_WAIT --time_wait--> CLOSED
    anything --reset / RST in window / give-up--> CLOSED
    FIN_WAIT_2, CLOSE_WAIT --idle-timeout--> CLOSED (RST to the guest)

HELD exists so that the guest's SYN is answered only once the host connect
has succeeded (a refused host connect becomes an RST, a timeout silence),
which is what the guest would have seen talking to the host directly. In
HELD nothing is sent and segments are ignored; the adapter absorbs the
guest's SYN retransmits meanwhile. ``close()`` before the handshake is over
is remembered and takes effect on entering ESTABLISHED.

The ``_ROWS`` table below is the whole machine: (state, input) -> (next
state, event). ``_transition`` is the only code that changes ``state`` or
queues an event: it applies the row, queues its event, and runs the entry
actions of the new state (the TIME-WAIT timer; on CLOSED the cleanup and
Closed, exactly once whatever the path, as CLOSED has no way out). An input
without a row raises IllegalTransition. Every abrupt end (adapter reset,
guest RST, give-up) goes through ``_reset``, which also sends the RST when
one is wanted and the state has one to send.

Guest to host (receiving)
-------------------------
In-order data inside our window is delivered at once to ``take_received``.
Out-of-order data inside the window is kept (copied, merged, bounded by the
window) until the gap fills, and answered at once with a duplicate ACK: that
is what drives the guest's fast retransmit. When the guest's SYN offered SACK
(RFC 2018) every ACK without data carries SACK blocks for what is held, the
block of the latest arrival first, up to four: the guest then resends only
the holes, several per round trip, instead of one hole per RTT or waiting for
its RTO (without them a Linux guest moved 23 MB in 75 s through 5 % loss and
25 % reordering). A segment we already hold (wholly old, or out of order and
held) is reported as a D-SACK block first (RFC 2883): the guest's sender then
knows its resend was needless, undoes its cwnd cut and learns the link
reorders. SACK blocks ride on pure ACKs only, so data segments stay one
MSS (less the timestamps, below). A FIN is taken in order only (a FIN seen
ahead of a gap is remembered). Everything else is cumulative:
``flush`` sends one ACK for the whole batch if one is owed, so a burst of
segments costs one ACK, not one each. Wholly old segments (our ACK was lost)
and data beyond the window are re-ACKed; pure ACKs are never answered, so
two confused peers cannot ACK each other forever.

Flow control toward the host is the advertised window. While the host
transport accepts data we offer ``receive_window`` past ``rcv_nxt``. When the
adapter pauses (``set_receive_open(False)``) the right edge we already
offered is frozen: the guest may fill it and the window decays to zero. The
edge never shrinks: data up to it is always accepted (a scaled window field
may show it up to 2**shift - 1 bytes short, see ``_window_field``). On
resume we offer the full window again and send a window update at once.

Host to guest (sending)
-----------------------
``send`` appends to the send buffer (``sendbuf.SendBuffer``, the host's
read chunks from ``snd_una`` on): acknowledged bytes are dropped from its
front, bytes in flight and unsent bytes follow, and segments are sliced from
it without a copy where they lie in one chunk. ``send`` never refuses bytes;
bounding the buffer is the adapter's business (it pauses the host reader
above ``send_buffer_limit``). ``flush`` sends what the guest's window allows,
in segments of the send MSS (or of ``segment_size`` with GSO) with PSH on
the last one. Small writes made between two flushes therefore travel as full
segments; a window-limited short tail is held back while data is in flight
(sender-side silly window avoidance). The FIN goes after the last byte, on
the last data segment when it can.

Work per flush is bounded: at most ``burst_segments`` segments leave in one
``flush``; a flush that stops there sets ``wants_flush`` and the adapter
flushes again on the next reactor turn, so a connection with a huge window
cannot monopolise the reactor. The send MSS is the guest's, clamped to
[MIN_SND_MSS (48, Linux's tcp_min_snd_mss), mss_limit]: a SYN announcing
MSS 1 cannot turn a download into one frame per byte.

There is no congestion control: the path to the guest is a local virtual
link whose only real limit is the guest's receive window (which we obey).
Loss there (full TAP queues, full datagram queues) is repaired by
retransmission:

- with SACK (the guest's blocks kept in a scoreboard, ``_sacked``), as RFC
  6675: recovery starts at DupThresh (3) duplicate ACKs or 3 segments SACKed
  above the first hole; each recovery *round* resends every hole that is
  lost, once. A hole is lost when 3 segments above it are SACKed (IsLost)
  *and* it is overdue: it left (``_xmit_log``, one entry per flush) more
  than the reordering wait ago, a quarter more than the longer of SRTT and
  the recent round trip of SACKed data (RACK's idea, RFC 8985; a timer,
  ``_reo_timer``, looks again when a held-back hole comes due). Each D-SACK
  from the guest (a resend it already had) makes the quarter a sixteenth
  more, up to a whole RTT (RACK's reo_wnd adaptation). So a link
  that reorders does not make us resend what is merely late. A resend that
  is itself lost shows as data sent after the round being SACKed while the
  hole stays: a new round starts (``tcp-lost-retransmit``) without an RTO.
  After an RTO every hole is resent. Partial ACKs move the round on;
- the probe timeout (SACK connections): data in flight and no ACK progress
  for max(2 RTT, 10 ms) (plus 200 ms of the guest's delayed ACK when one
  segment is out): every hole of the scoreboard (or the first segment) is
  resent, up to 3 times (1, 3, 7 PTOs), before the RTO. The guest cannot
  open its window past a hole, so a lost resend there would otherwise wait
  the 200 ms+ of an RTO with nothing else to send (RFC 8985's tail loss
  probe, loosely);
- without SACK, NewReno: one fast retransmit at the 3rd duplicate ACK, then
  the next hole on each partial ACK.

The counters (``tcp-fast-recovery``, ``tcp-retransmits``, ``tcp-rto``,
``tcp-probe``, ``tcp-lost-retransmit``, ``tcp-dsack-received``,
``tcp-ooo-received``, ``tcp-paws-rejected``, ``tcp-rtt-from-timestamps``)
go to ``counters``, which the
adapter points at the stack's, so /stats shows them.

Timestamps
----------
When the guest's SYN offers timestamps (RFC 7323), or its SYN-ACK answers
ours, every segment we send carries TSval (a per-connection offset plus a
millisecond clock from ``now``, never going back even if ``now`` does) and
TSecr, the echo of TS.Recent. TS.Recent follows section 4.3: it takes the
TSval of an acceptable segment only when that segment starts at or before
the last ACK we sent (``_last_ack_sent``), so with a batch of segments, or
out-of-order ones, we echo the earliest the ACK covers and the guest
measures the whole delay. Three uses:

- the guest's RTT (and RTO) sees through its own retransmissions; a Linux
  guest without SACK but with timestamps was measured to move 50 MB up
  through 5 % loss in 72 s, without either only 3.8 MB in 80 s;
- our RTO: an ACK of new data that covers retransmitted data (where Karn's
  rule takes no sample) gives one from its TSecr, the time since the start
  of the millisecond it names (never under the true RTT, at most 1 ms
  over); segments never resent are still timed exactly;
- PAWS (section 5): a segment with data (or FIN, SYN) whose TSval is older
  than TS.Recent by more than ``paws_window`` ticks is dropped
  (``tcp-paws-rejected``) and answered with an ACK (a D-SACK if it was old
  data). Two departures from Linux, both measured through the lossy bench
  (5 % loss, 25 % reordering): pure ACKs are not checked (their ACK field
  is validated anyway, and a reordered ACK's SACK blocks are news: with
  them dropped, a SACK download took half again as long), and the window
  is 200 ticks, not 1 (data reordered by a few ms is not a wrapped
  duplicate). An RST is never checked, and a TS.Recent idle for 24 days
  is no longer held against anyone.

The option takes 12 bytes of every segment: the send MSS (the payload per
segment) is the guest's MSS less those, and so is the GSO segment size.

Timers
------
One deadline (``next_deadline``, the earliest of them) serves every timer:

- SYN / SYN-ACK retransmission, ``syn_retries`` (3) times with doubling RTO,
  then TimedOut (active open) or RST + GuestReset (passive open);
- retransmission (RFC 6298: SRTT/RTTVAR from samples of segments never
  retransmitted, clamped to [rto_min, rto_max], doubled on each timeout and
  reset by an ACK of new data); it resends the first unacknowledged segment
  (with a SACK scoreboard: every hole); loss recovery before the RTO is
  above. After ``max_retransmits`` timeouts in a row: RST to the guest,
  GuestReset, CLOSED;
- persist: with data waiting and a zero guest window, 1-byte probes with
  backoff; any ACK from the guest resets the give-up count, so a live guest
  that keeps its window shut is probed forever;
- reordering: when a hole held back by the reordering wait comes due
  (``_reo_timer``), and the probe (see above);
- TIME-WAIT: ``time_wait`` seconds (bounded; the guest is on a local link);
- idle: FIN_WAIT_2 without guest data for ``fin_wait2_timeout`` (60 s, as
  Linux's tcp_fin_timeout) and CLOSE_WAIT without host data for
  ``close_wait_timeout``: RST to the guest, GuestReset("idle"), CLOSED, so
  neither a guest that never sends its FIN nor a host peer that never closes
  holds a host socket for ever.

There is no delayed ACK: ``flush`` at the end of each batch is the ACK
clock, which coalesces as well and adds no latency (a delayed-ACK timer was
tried and measured to save nothing here, see docs/performance.md).

Sequence numbers are 32-bit and wrap; all comparisons go through seq_diff.
"""

import enum
from collections import Counter, deque

import attrs

from ..wire.tcp import (ACK, FIN, MAX_SACK_BLOCKS, MAX_SACK_BLOCKS_TS, PSH, RST, SYN,
                        TS_OPTION_LEN, TcpSegment)
from .sendbuf import SendBuffer

MASK = 0xFFFFFFFF
_DEFAULT_MSS = 536  # RFC 1122: the MSS to assume when the SYN has none
#: The smallest send MSS we accept from a guest (Linux's ``tcp_min_snd_mss``
#: default): a SYN announcing less is taken as 48, so a guest cannot make us
#: cut a download into one-byte segments (4 MB would be 4M frames).
MIN_SND_MSS = 48
#: A TS.Recent idle this long is no longer valid for PAWS (RFC 7323 5.5).
_PAWS_IDLE = 24 * 86400.0


def seq_diff(a, b):
    """``a - b`` as a signed distance in 32-bit sequence space."""
    d = (a - b) & MASK
    return d - 0x100000000 if d & 0x80000000 else d


def seq_lt(a, b):
    return seq_diff(a, b) < 0


def seq_le(a, b):
    return seq_diff(a, b) <= 0


class TcpState(enum.Enum):
    HELD = "HELD"
    SYN_SENT = "SYN_SENT"
    SYN_RECEIVED = "SYN_RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME_WAIT"
    CLOSED = "CLOSED"


HELD = TcpState.HELD
SYN_SENT = TcpState.SYN_SENT
SYN_RECEIVED = TcpState.SYN_RECEIVED
ESTABLISHED = TcpState.ESTABLISHED
CLOSE_WAIT = TcpState.CLOSE_WAIT
LAST_ACK = TcpState.LAST_ACK
FIN_WAIT_1 = TcpState.FIN_WAIT_1
FIN_WAIT_2 = TcpState.FIN_WAIT_2
CLOSING = TcpState.CLOSING
TIME_WAIT = TcpState.TIME_WAIT
CLOSED = TcpState.CLOSED

# Both sequence spaces are known: guest segments are checked against our window.
_SYNCHRONIZED = frozenset({SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT, LAST_ACK, FIN_WAIT_1,
                           FIN_WAIT_2, CLOSING, TIME_WAIT})
# Cumulative ACKs make sense (SYN_RECEIVED answers with its SYN-ACK instead).
_ACKING = _SYNCHRONIZED - {SYN_RECEIVED}
# The guest has not sent its FIN yet: its data is accepted.
_RECEIVING = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})
# Our data or FIN may still be unsent (CLOSING too: the guest's FIN may cross
# a FIN of ours still queued behind data).
_SENDING = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, LAST_ACK, CLOSING})
# Host data is still welcome.
_ACCEPTS_SEND = frozenset({HELD, SYN_SENT, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT})


@attrs.frozen
class TcpParams:
    """Tunables of a connection; the adapter sets ``mss_limit`` to link MTU - 40."""

    mss_limit: int = 1460
    receive_window: int = 262144
    #: Not enforced here (``send`` always queues): the adapter pauses the host
    #: reader while ``send_buffered`` is above it and resumes below half.
    send_buffer_limit: int = 1048576
    window_scale: int = 7
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 60.0
    max_retransmits: int = 12
    #: SYN and SYN-ACK retransmissions before giving up: 3 with a 1 s initial
    #: RTO is 15 s (Linux's 5 SYN-ACK retries take 63 s; 6 took 127 s, which
    #: let a SYN flood hold host sockets for two minutes each).
    syn_retries: int = 3
    time_wait: float = 2.0
    #: Seconds FIN_WAIT_2 may go without guest data (Linux's tcp_fin_timeout,
    #: 60 s): the host has closed, and a guest that never sends its FIN must
    #: not hold the host socket for ever.
    fin_wait2_timeout: float = 60.0
    #: Seconds CLOSE_WAIT may go without host data: the guest has closed and
    #: the host peer neither answers nor closes.
    close_wait_timeout: float = 300.0
    #: Largest payload per emitted segment when the link segments for us (GSO):
    #: segments carry up to this many bytes and the link cuts them to the MSS.
    #: None: one MSS per segment.
    segment_size: int | None = None
    #: Segments one ``flush`` may emit at most (the per-reactor-turn budget):
    #: more is left for the next turn (``wants_flush``), so one connection
    #: with a huge window and a tiny MSS cannot starve the others.
    burst_segments: int = 128
    #: Offer and accept SACK (RFC 2018): SACK blocks for the guest's
    #: out-of-order data, and the guest's blocks to resend only the holes.
    sack: bool = True
    #: Offer and accept timestamps (RFC 7323): RTT samples through
    #: retransmissions on both sides, and PAWS.
    timestamps: bool = True
    #: PAWS drops guest data whose TSval is more than this many of the
    #: guest's ticks older than TS.Recent (Linux: 1). Wider, because a
    #: segment merely reordered by a few milliseconds is not a wrapped old
    #: duplicate (at a local link's few Gbit/s the sequence space takes
    #: seconds to wrap; 200 ticks of a 1 ms clock is 200 ms): with 1, a
    #: Linux guest's upload through 5 % loss and 25 % reordering (no SACK)
    #: took twice as long, its reordered data dropped as if lost.
    paws_window: int = 200
    #: Seconds per tick of our TSval clock (RFC 7323 allows 1 ms to 1 s).
    ts_tick: float = 0.001
    #: Segments SACKed above a hole before it counts as lost (RFC 6675's
    #: DupThresh): fewer would resend what reordering merely delayed.
    dup_threshold: int = 3
    #: The probe timeout (SACK connections): with data in flight and no ACK
    #: progress for max(2 RTT, probe_min) seconds, resend the holes (or the
    #: first segment) once, without the RTO's backoff: a lost resend behind a
    #: window the guest cannot open, or a lost tail, then costs milliseconds,
    #: not the 200 ms+ of an RTO (RFC 8985's tail loss probe, loosely).
    probe_min: float = 0.01
    #: Added to the probe timeout when one segment is in flight: the guest may
    #: be delaying its ACK (Linux: up to 200 ms).
    max_ack_delay: float = 0.2
    #: Probes in a row without progress (at 1, 3, 7 PTOs) before only the RTO
    #: is left.
    max_probes: int = 3

    def __attrs_post_init__(self):
        if not 1 <= self.mss_limit <= 65535:
            raise ValueError(f"mss_limit {self.mss_limit} is not a 16-bit MSS")
        if not 0 <= self.window_scale <= 14:
            raise ValueError(f"window_scale {self.window_scale} is not in 0..14 (RFC 7323)")
        if self.receive_window < 1 << self.window_scale:
            # The scaled window field would always read 0: the guest could never send.
            raise ValueError(f"receive_window {self.receive_window} is below the window "
                             f"scale's granularity ({1 << self.window_scale})")
        if not 0 < self.rto_min <= self.rto_max:
            raise ValueError("need 0 < rto_min <= rto_max")
        if not (self.fin_wait2_timeout > 0 and self.close_wait_timeout > 0):
            raise ValueError("FIN_WAIT_2 and CLOSE_WAIT timeouts must be positive")
        if self.burst_segments < 1:
            raise ValueError("burst_segments must be at least 1")
        if not 0 <= self.paws_window < 1 << 30:
            raise ValueError("paws_window must be in 0..2**30 ticks")
        if not 0.001 <= self.ts_tick <= 1.0:
            raise ValueError("ts_tick must be 1 ms to 1 s (RFC 7323 5.4)")


# -- events


@attrs.frozen
class Established:
    """The handshake is complete: start relaying."""


@attrs.frozen
class GuestEndOfData:
    """The guest sent FIN: half-close the host socket's write side."""


@attrs.frozen
class GuestReset:
    """The guest reset the connection, or stopped answering: abort the host side."""

    reason: str = "rst"  # "rst" or "timeout"


@attrs.frozen
class Refused:
    """Active open: the guest answered our SYN with RST."""


@attrs.frozen
class TimedOut:
    """Active open: the guest never answered our SYN."""


@attrs.frozen
class Closed:
    """The connection is over; the adapter may forget it."""


class IllegalTransition(Exception):
    """The caller drove the connection with an input its state does not allow.

    A bug in the adapter (accept twice, close after close, send after close,
    reset when already closed), never the guest's doing: whatever a guest
    sends is legal input and gets the answer RFC 9293 gives it.
    """

    def __init__(self, state, what):
        super().__init__(f"{what!r} is not allowed in {state.name}")
        self.state = state
        self.input = what


# Events are values: one instance each is enough (no allocation per event).
_ESTABLISHED = Established()
_END_OF_DATA = GuestEndOfData()
_GUEST_RST = GuestReset("rst")
_GIVE_UP = GuestReset("timeout")
_IDLE = GuestReset("idle")
_REFUSED = Refused()
_TIMED_OUT = TimedOut()
_CLOSED = Closed()

# The whole state machine: (state, input) -> (next state, event to emit).
# Entering CLOSED emits Closed as well; see _transition for the entry actions.
# Inputs:
#   accept        the host connect succeeded            (adapter)
#   host-close    host EOF; before ESTABLISHED it is     (adapter)
#                 remembered and replayed on entering ESTABLISHED
#   reset         reset or drop the connection           (adapter)
#   syn-ack       the guest answered our SYN
#   syn-acked     the guest acknowledged our SYN-ACK
#   guest-fin     the guest's FIN, in order
#   fin-acked     the guest acknowledged our FIN
#   guest-rst     an acceptable RST from the guest
#   give-up       retransmissions exhausted
#   idle-timeout  FIN_WAIT_2 / CLOSE_WAIT without progress for too long
#   time-wait-over
# Anything else raises IllegalTransition.
_ROWS = (
    # state        input             next state    event
    (HELD,         "accept",         SYN_RECEIVED, None),
    (HELD,         "host-close",     HELD,         None),
    (SYN_SENT,     "syn-ack",        ESTABLISHED,  _ESTABLISHED),
    (SYN_SENT,     "host-close",     SYN_SENT,     None),
    (SYN_SENT,     "guest-rst",      CLOSED,       _REFUSED),
    (SYN_SENT,     "give-up",        CLOSED,       _TIMED_OUT),
    (SYN_RECEIVED, "syn-acked",      ESTABLISHED,  _ESTABLISHED),
    (SYN_RECEIVED, "host-close",     SYN_RECEIVED, None),
    (ESTABLISHED,  "guest-fin",      CLOSE_WAIT,   _END_OF_DATA),
    (ESTABLISHED,  "host-close",     FIN_WAIT_1,   None),
    (CLOSE_WAIT,   "host-close",     LAST_ACK,     None),
    (LAST_ACK,     "fin-acked",      CLOSED,       None),
    (FIN_WAIT_1,   "fin-acked",      FIN_WAIT_2,   None),
    (FIN_WAIT_1,   "guest-fin",      CLOSING,      _END_OF_DATA),
    (FIN_WAIT_2,   "guest-fin",      TIME_WAIT,    _END_OF_DATA),
    (CLOSING,      "fin-acked",      TIME_WAIT,    None),
    (TIME_WAIT,    "time-wait-over", CLOSED,       None),
    (TIME_WAIT,    "guest-rst",      CLOSED,       None),   # both sides are done already
    (FIN_WAIT_2,   "idle-timeout",   CLOSED,       _IDLE),
    (CLOSE_WAIT,   "idle-timeout",   CLOSED,       _IDLE),
) + tuple(
    (state, what, CLOSED, event)
    for state in (SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT, LAST_ACK, FIN_WAIT_1, FIN_WAIT_2,
                  CLOSING)
    for what, event in (("guest-rst", _GUEST_RST), ("give-up", _GIVE_UP))
) + tuple((state, "reset", CLOSED, None) for state in TcpState if state is not CLOSED)

_TRANSITIONS = {state: {} for state in TcpState}
for _state, _what, _next, _event in _ROWS:
    assert _what not in _TRANSITIONS[_state], (_state, _what)
    _TRANSITIONS[_state][_what] = (_next, _event)
del _state, _what, _next, _event


class TcpConnection:
    """One guest TCP connection; see the module docstring."""

    __slots__ = (
        "state", "params", "local_port", "guest_port", "created_at",
        "bytes_from_guest", "bytes_to_guest",
        # send side
        "iss", "snd_una", "snd_nxt", "snd_wnd", "snd_shift", "send_mss",
        "_wl1", "_wl2", "_sendbuf", "_fin_queued", "_fin_sent",
        "_dupacks", "_in_recovery", "_recover", "_more", "_host_sent", "_idle_since",
        "_sack_ok", "_sacked", "_rexmit_next", "_round_end", "_round_time", "_xmit_log",
        "_rack_rtt", "_reo_timer", "_progress", "_probes", "_reo_factor", "_karn",
        "counters",
        # timestamps (RFC 7323)
        "_ts_ok", "_ts_offset", "_ts_hz", "_ts_ms", "_tsval", "_ts_recent", "_ts_recent_time",
        "_last_ack_sent", "_sack_max",
        # receive side
        "irs", "rcv_nxt", "rcv_shift", "_rcv_adv", "_receive_open", "_ack_owed",
        "_ooo", "_ooo_fin", "_ooo_last", "_dsack", "_guest_wscale",
        # timers
        "_timer", "_rto", "_cur_rto", "_srtt", "_rttvar", "_rtt_seq", "_rtt_time",
        "_retries",
        # outputs
        "_out", "_received", "_events",
    )

    def __init__(self, local_port, guest_port, now, iss, params, state, ts_offset=None):
        self.state = state
        self.params = params
        self.local_port = local_port
        self.guest_port = guest_port
        self.created_at = now
        self.bytes_from_guest = 0
        self.bytes_to_guest = 0
        iss &= MASK
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = (iss + 1) & MASK  # our SYN, once sent
        self.snd_wnd = 0
        self.snd_shift = 0
        self.send_mss = min(params.mss_limit, _DEFAULT_MSS)
        self._wl1 = 0
        self._wl2 = 0
        self._sendbuf = SendBuffer()
        self._fin_queued = False
        self._fin_sent = False
        self._dupacks = 0
        self._in_recovery = False
        self._recover = 0
        self._more = False
        self._host_sent = False
        self._idle_since = now
        self._sack_ok = False
        self._sacked = []  # [left, right] seqs the guest SACKed, sorted, merged
        self._rexmit_next = 0  # this recovery round has resent the holes below it
        self._round_end = 0  # snd_nxt when the round began
        self._round_time = 0.0
        #: (snd_nxt after, time) per flush that sent new data, from snd_una on:
        #: when each byte first left, for the time test of loss (RACK-like).
        self._xmit_log = deque()
        #: Round trip of SACKed data, from the log: rises at once, decays slowly.
        self._rack_rtt = 0.0
        #: When a hole held back only by the reordering wait becomes lost.
        self._reo_timer = None
        self._progress = now  # the last ACK of new data, or the first send after none
        self._probes = 0  # probes fired since that progress
        #: The reordering wait in RTTs: 1.25, raised by the guest's D-SACKs
        #: of needless resends (RACK's reo_wnd adaptation), up to 2.
        self._reo_factor = 1.25
        #: A resend has made the timed segment ambiguous (Karn): RTT samples
        #: come from timestamps until new data is timed again.
        self._karn = False
        #: Timestamps negotiated; TSval's offset (random from the adapter,
        #: else one derived from the ISS), the latest millisecond of ``now``
        #: and TSval from them; TS.Recent and when it was set; rcv_nxt as
        #: the last ACK we sent carried it.
        self._ts_ok = False
        if ts_offset is None:
            ts_offset = (iss * 0x9E3779B1 + 0x7F4A7C15) & MASK
        self._ts_offset = ts_offset & MASK
        self._ts_hz = 1.0 / params.ts_tick  # ticks per second (1000.0 exactly for 1 ms)
        self._ts_ms = int(now * self._ts_hz)
        self._tsval = (self._ts_offset + self._ts_ms) & MASK
        self._ts_recent = 0
        self._ts_recent_time = now
        self._last_ack_sent = 0
        #: SACK blocks that fit beside the other options of our ACKs.
        self._sack_max = MAX_SACK_BLOCKS
        #: Loss-recovery counters; the adapter hands every connection its own
        #: stack-wide Counter, so /stats shows them.
        self.counters = Counter()
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_shift = 0
        self._rcv_adv = 0
        self._receive_open = True
        self._ack_owed = False
        self._ooo = []  # [seq, bytes], sorted, non-overlapping
        self._ooo_fin = None
        self._ooo_last = 0
        self._dsack = None  # (left, right) of a duplicate to report (RFC 2883)
        self._guest_wscale = None
        self._timer = None
        self._rto = self._cur_rto = params.rto_initial
        self._srtt = None
        self._rttvar = 0.0
        self._rtt_seq = None
        self._rtt_time = 0.0
        self._retries = 0
        self._out = []
        self._received = []
        self._events = []

    def __repr__(self):
        return (f"<TcpConnection {self.local_port}<->{self.guest_port} {self.state.name} "
                f"una={self.snd_una} nxt={self.snd_nxt} rcv={self.rcv_nxt}>")

    # -- opening

    @classmethod
    def from_guest_syn(cls, syn, now, iss, params, ts_offset=None):
        """The guest's SYN arrived; wait in HELD for the host connect."""
        self = cls(syn.dst_port, syn.src_port, now, iss, params, HELD, ts_offset)
        self.irs = syn.seq & MASK
        self.rcv_nxt = (self.irs + 1) & MASK
        self._wl1 = self.irs
        self.snd_wnd = syn.window  # never scaled in a SYN
        self._sack_ok = params.sack and syn.sack is True
        self._negotiate(syn.mss, syn.wscale, syn.tsval, now)
        return self

    @classmethod
    def open_to_guest(cls, local_port, guest_port, now, iss, params, ts_offset=None):
        """Active open (port forwarding): send our SYN."""
        self = cls(local_port, guest_port, now, iss, params, SYN_SENT, ts_offset)
        self._send_syn(now)
        return self

    def accept(self, now):
        """The host connect succeeded: answer the held SYN."""
        self._transition("accept", now)
        self._send_syn(now)

    # -- host side

    def send(self, data):
        """Queue host bytes for the guest; they leave on the next ``flush``.

        Only before ``close`` and while the connection is open: host bytes
        that could never reach the guest are a bug of the caller, not a drop.
        """
        if self._fin_queued or self.state not in _ACCEPTS_SEND:
            raise IllegalTransition(self.state, "send")
        self._sendbuf.append(data)
        self._host_sent = True

    def close(self, now):
        """Host EOF: FIN after everything already queued (once)."""
        if self._fin_queued:
            raise IllegalTransition(self.state, "host-close")
        self._transition("host-close", now)
        self._fin_queued = True
        if self.state in _SENDING:
            if self._ts_ok:
                self._tick(now)
            self._push(now)

    def reset(self, rst=True):
        """End the connection now, from the host side.

        ``rst``: tell the guest with an RST, as the host would have (host
        connect refused, host reset, host socket gone). False drops the
        connection without a word (replaced by a new SYN, ICMP sent
        instead, stack shutting down). Not allowed once CLOSED.
        """
        self._reset("reset", rst)

    def set_receive_open(self, is_open, now):
        """Host transport paused (False) or resumed (True)."""
        is_open = bool(is_open)
        if is_open == self._receive_open:
            return
        self._receive_open = is_open
        if is_open and self.state in _RECEIVING:
            if self._ts_ok:
                self._tick(now)
            self._emit(ACK, self.snd_nxt)  # window update

    # -- batches and timers

    def flush(self, now):
        """End of a batch: send what the window allows, then any owed ACK."""
        st = self.state
        self._more = False
        if self._ts_ok:
            self._tick(now)
        if self._host_sent:
            self._host_sent = False
            if st is CLOSE_WAIT:
                self._idle_since = now  # the host is still talking
        if st in _SENDING:
            self._push(now)
        if self._ack_owed:
            if st in _ACKING:
                self._emit(ACK, self.snd_nxt)
            else:
                self._ack_owed = False

    def next_deadline(self):
        """When ``on_timer`` is due, or None."""
        timer = self._timer
        reo = self._reo_timer
        if reo is not None and (timer is None or reo < timer):
            timer = reo
        # The probe counts only on the terms on_timer fires it: a deadline it
        # would not act on (a zero window) stays in the past, and the adapter
        # re-arms at once, in a loop, until the next real deadline.
        if timer is not None and self._sack_ok and self._probes < self.params.max_probes \
                and self.snd_wnd and self.state in _SENDING:
            probe = self._probe_deadline()
            if probe is not None and probe < timer:
                timer = probe
        st = self.state
        if st is FIN_WAIT_2 or st is CLOSE_WAIT:
            idle = self._idle_deadline()
            if timer is None or idle < timer:
                return idle
        return timer

    def _probe_deadline(self):
        """When the probe is due (data in flight, no progress), or None."""
        flight = (self.snd_nxt - self.snd_una) & MASK
        if not flight or self._srtt is None:
            return None
        rtt = self._srtt if self._srtt > self._rack_rtt else self._rack_rtt
        pto = 2 * rtt
        if pto < self.params.probe_min:
            pto = self.params.probe_min
        if flight <= self.send_mss:
            pto += self.params.max_ack_delay
        # Each probe in a row waits twice as long as the one before.
        return self._progress + pto * ((1 << (self._probes + 1)) - 1)

    def _idle_deadline(self):
        p = self.params
        return self._idle_since + (p.fin_wait2_timeout if self.state is FIN_WAIT_2
                                   else p.close_wait_timeout)

    def on_timer(self, now):
        """The deadline passed (a late or stale call is harmless)."""
        st = self.state
        if self._ts_ok:
            self._tick(now)
        if (st is FIN_WAIT_2 or st is CLOSE_WAIT) and now >= self._idle_deadline():
            self._reset("idle-timeout", True)
            return
        reo = self._reo_timer
        if reo is not None and now >= reo:
            self._reo_timer = None
            if self._in_recovery and st in _SENDING:
                self._repair(now, False)  # what was only late is lost by now
        if self._sack_ok and self._probes < self.params.max_probes and st in _SENDING \
                and self.snd_wnd:
            probe = self._probe_deadline()
            if probe is not None and now >= probe:
                self._probes += 1
                self.counters["tcp-probe"] += 1
                self._in_recovery = True
                if self._sacked:
                    self._new_round(now, True)
                else:
                    self._new_round(now)  # the first segment: its ACK tells the rest
        deadline = self._timer
        if deadline is None or now < deadline:
            return
        self._timer = None
        p = self.params
        if st is TIME_WAIT:
            self._transition("time-wait-over", now)
            return
        if st is SYN_SENT or st is SYN_RECEIVED:
            self._retries += 1
            if self._retries > p.syn_retries:
                self._reset("give-up", True)
                return
            self._cur_rto = min(self._cur_rto * 2, p.rto_max)
            self._send_syn(now)
            self._rtt_seq = None  # Karn
            return
        if st not in _SYNCHRONIZED:
            return
        in_flight = self.snd_nxt != self.snd_una
        probing = self.snd_wnd == 0 and (in_flight or self._has_unsent())
        if not (probing or in_flight):
            self._push(now)
            return
        self._retries += 1
        if self._retries > p.max_retransmits:
            self._reset("give-up", True)
            return
        if probing:
            self._probe()
        else:
            self.counters["tcp-rto"] += 1
            self._in_recovery = True
            if self._sack_ok and self._sacked:
                self._new_round(now, True)  # every hole the scoreboard shows, not one
            else:
                n = self._retransmit()
                self.counters["tcp-retransmits"] += 1
                self._recover = self.snd_nxt
                self._round_end = self.snd_nxt
                # The first segment is resent: a partial ACK goes on from there.
                self._rexmit_next = (self.snd_una + n) & MASK
        self._cur_rto = min(self._cur_rto * 2, p.rto_max)
        self._timer = now + self._cur_rto

    # -- outputs

    def take_segments(self):
        out = self._out
        self._out = []
        return out

    def take_received(self):
        out = self._received
        self._received = []
        return out

    def take_events(self):
        out = self._events
        self._events = []
        return out

    @property
    def wants_flush(self):
        """The last flush stopped at its segment budget with more to send:
        flush again on the next reactor turn."""
        return self._more

    @property
    def send_buffered(self):
        """Host bytes the guest has not acknowledged yet (unsent + in flight)."""
        return len(self._sendbuf)

    @property
    def is_closed(self):
        return self.state is CLOSED

    @staticmethod
    def reset_for(seg):
        """The RFC 793 answer to a segment that matches no connection."""
        if seg.flags & RST:
            return None
        if seg.flags & ACK:
            return TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
        return TcpSegment(seg.dst_port, seg.src_port, 0, (seg.seq + seg.seq_len) & MASK,
                          RST | ACK, 0)

    # -- the state machine

    def _transition(self, what, now):
        """Apply input ``what``: the table's move, its event, the entry actions.

        The only place ``state`` changes and events are queued. An input the
        table has no move for raises IllegalTransition before anything changes.
        """
        old = self.state
        move = _TRANSITIONS[old].get(what)
        if move is None:
            raise IllegalTransition(old, what)
        new, event = move
        if event is not None:
            self._events.append(event)
        if new is old:
            return  # host-close before ESTABLISHED: remembered in _fin_queued
        self.state = new
        if new is FIN_WAIT_2 or new is CLOSE_WAIT:
            self._idle_since = now
        if new is ESTABLISHED:
            if self._fin_queued:  # close() came during the handshake
                self._transition("host-close", now)
        elif new is TIME_WAIT:
            self._timer = now + self.params.time_wait
        elif new is CLOSED:
            self._timer = None
            self._reo_timer = None
            self._sendbuf.clear()
            self._ooo = []
            self._events.append(_CLOSED)  # once: CLOSED has no way out

    def _reset(self, what, rst):
        """The one way to CLOSED other than the orderly close, RST or not.

        ``what`` is "reset" (the adapter), "guest-rst" or "give-up"; the
        table picks the event. The RST, when asked for, is the one the state
        allows: the RFC 793 answer to the held SYN in HELD, RST|ACK at
        snd_nxt once synchronized, nothing in SYN_SENT (the guest has said
        nothing to reset) or TIME_WAIT (both sides are done).
        """
        st = self.state
        self._transition(what, None)
        if rst:
            if st is HELD:
                self._out.append(TcpSegment(self.local_port, self.guest_port, 0, self.rcv_nxt,
                                            RST | ACK, 0))
            elif st is not TIME_WAIT and st in _SYNCHRONIZED:
                self._emit(RST | ACK, self.snd_nxt)

    # -- segment arrival

    def segment_received(self, seg, now):
        st = self.state
        if self._ts_ok:
            self._tick(now)
        if st in _SYNCHRONIZED:
            self._synchronized(seg, now)
        elif st is SYN_SENT:
            self._syn_sent(seg, now)
        # HELD: the adapter absorbs the guest's SYN retransmits; CLOSED: over.

    def _syn_sent(self, seg, now):
        flags = seg.flags
        if flags & ACK and seg.ack != self.snd_nxt:
            if not flags & RST:
                self._out.append(TcpSegment(self.local_port, self.guest_port, seg.ack, 0,
                                            RST, 0))
            return
        if flags & RST:
            if flags & ACK:
                self._reset("guest-rst", False)  # Refused
            return
        if flags & SYN and flags & ACK:
            self.irs = seg.seq & MASK
            self.rcv_nxt = (self.irs + 1) & MASK
            self._rcv_adv = (self.rcv_nxt + min(self.params.receive_window, 65535)) & MASK
            self._sack_ok = self.params.sack and seg.sack is True
            # Timestamps only if our SYN offered them and the guest echoes.
            self._negotiate(seg.mss, seg.wscale, seg.tsval, now)
            if self._ts_ok:
                self._tick(now)
            self._handshake_done(seg, now, seg.window)
            self._emit(ACK, self.snd_nxt)
            self._transition("syn-ack", now)
        # A bare SYN (simultaneous open) is not supported: our SYN retransmits.

    def _synchronized(self, seg, now):
        flags = seg.flags
        seq = seg.seq
        rcv_nxt = self.rcv_nxt
        if flags & RST:
            if seq == rcv_nxt or (seq_lt(rcv_nxt, seq) and seq_lt(seq, self._rcv_adv)):
                self._reset("guest-rst", False)
            return
        tsval = seg.tsval
        if tsval is not None and self._ts_ok and (seg.payload or flags & (FIN | SYN)):
            old = (self._ts_recent - tsval) & MASK
            if self.params.paws_window < old < 0x80000000 \
                    and now - self._ts_recent_time < _PAWS_IDLE:
                # PAWS (RFC 7323 5.3 R1): data older than TS.Recent by more
                # than the window; dropped and answered with an ACK.
                self.counters["tcp-paws-rejected"] += 1
                self._ack_owed = True
                n = len(seg.payload)
                if n and self._sack_ok and seq_lt(seq, rcv_nxt):
                    # An old duplicate: D-SACK it, as the re-ACK of old data does.
                    end = (seq + n) & MASK
                    self._dsack = (seq, end if seq_lt(end, rcv_nxt) else rcv_nxt)
                return
        if flags & SYN:
            if self.state is SYN_RECEIVED and seq == self.irs and not flags & ACK:
                if tsval is not None and self._ts_ok:
                    self._ts_recent = tsval  # echo the SYN this SYN-ACK answers
                self._send_syn(now)  # our SYN-ACK was lost
                self._rtt_seq = None
            else:
                self._emit(ACK, self.snd_nxt)  # challenge ACK (RFC 5961)
            return
        n = len(seg.payload)
        fin = flags & FIN
        if n or fin:
            if seq_le((seq + n + (1 if fin else 0)) & MASK, rcv_nxt):
                self._ack_owed = True  # all old: our ACK was lost
                if n and self._sack_ok:
                    # D-SACK: the guest learns its resend was needless (it
                    # undoes the cwnd cut and learns the link reorders).
                    self._dsack = (seq, (seq + n) & MASK)
                if fin and self.state is TIME_WAIT:
                    self._timer = now + self.params.time_wait
                return
            if seq != rcv_nxt and not seq_lt(seq, self._rcv_adv):
                self._ack_owed = True  # beyond the window
                return
        elif seq != rcv_nxt and not (seq_lt(rcv_nxt, seq) and seq_lt(seq, self._rcv_adv)):
            return  # a stale pure ACK: dropped, never answered
        if tsval is not None and self._ts_ok and seq_le(seq, self._last_ack_sent) \
                and ((tsval - self._ts_recent) & 0x80000000 == 0
                     or now - self._ts_recent_time >= _PAWS_IDLE):
            # RFC 7323 4.3: only a segment the last ACK sent covers sets
            # TS.Recent, so the echo is of the earliest segment we ACK.
            self._ts_recent = tsval
            self._ts_recent_time = now
        if not flags & ACK:
            return
        if self.state is SYN_RECEIVED:
            if seg.ack != self.snd_nxt:
                self._out.append(TcpSegment(self.local_port, self.guest_port, seg.ack, 0,
                                            RST, 0))
                return
            self._handshake_done(seg, now, seg.window << self.snd_shift)
            self._transition("syn-acked", now)
        elif not self._process_ack(seg, now):
            return
        if n or fin:
            if self.state in _RECEIVING:
                self._receive(seg.payload, seq, n, fin, now)
            else:
                self._ack_owed = True

    def _handshake_done(self, seg, now, window):
        """Our SYN is acknowledged (either direction of open)."""
        self.snd_una = self.snd_nxt
        self.snd_wnd = window
        self._wl1 = seg.seq
        self._wl2 = seg.ack
        if self._rtt_seq is not None:
            self._rtt_sample(now - self._rtt_time)
            self._rtt_seq = None
        elif self._ts_ok and seg.tsecr:
            self._ts_rtt_sample(seg.tsecr, now)  # our SYN(-ACK) was resent
        self._timer = None
        self._retries = 0
        self._cur_rto = self._rto

    def _process_ack(self, seg, now):
        """The ACK and window of an acceptable segment; False: drop the segment."""
        ack = seg.ack
        una = self.snd_una
        acked = seq_diff(ack, una)
        if acked > seq_diff(self.snd_nxt, una):
            if seg.payload or seg.flags & FIN:
                self._ack_owed = True  # acks what we never sent
            return False
        wnd = seg.window << self.snd_shift
        fin_acked = False
        if acked > 0:
            buf = self._sendbuf
            if acked > len(buf):  # the FIN too
                fin_acked = True
                self.bytes_to_guest += len(buf)
                buf.clear()
            else:
                buf.consume(acked)
                self.bytes_to_guest += acked
            self.snd_una = ack
            self._progress = now
            self._probes = 0
            if self._rtt_seq is not None:
                if seq_lt(self._rtt_seq, ack):
                    self._rtt_sample(now - self._rtt_time)
                    self._rtt_seq = None
            elif self._karn and self._ts_ok and seg.tsecr:
                # Resent data is acknowledged: Karn takes no sample, the echo can.
                self._ts_rtt_sample(seg.tsecr, now)
            self._cur_rto = self._rto
            self._retries = 0
            self._dupacks = 0
            self._timer = None
            if self._sacked:
                self._prune_sacked(ack)
            log = self._xmit_log
            while log and seq_le(log[0][0], ack):
                log.popleft()
        more_sacked = (seg.sack is not None and self._sack_ok and acked >= 0
                       and self._add_sack(seg.sack, now))
        if acked > 0:
            if self._in_recovery:
                if seq_lt(ack, self._recover):
                    self._partial_ack(ack, now)  # the next hole
                else:
                    self._in_recovery = False
                    self._reo_timer = None
        elif (acked == 0 and self.snd_nxt != una and not seg.payload and not seg.flags & FIN
              and (more_sacked or (wnd and wnd == self.snd_wnd))):
            self._dupacks += 1
            if not self._in_recovery:
                if self._dupacks >= self.params.dup_threshold or self._sack_says_lost():
                    self.counters["tcp-fast-recovery"] += 1
                    self._in_recovery = True
                    self._new_round(now)
            elif more_sacked:
                if (self._sacked and now - self._round_time >= self._reorder_wait()
                        and seq_diff(self._sacked[-1][1], self._round_end)
                        >= self.params.dup_threshold * self.send_mss):
                    # Data sent after this round's resends is SACKed and a hole
                    # is still there: a resend was lost. Resend again now
                    # rather than wait for the RTO.
                    self.counters["tcp-lost-retransmit"] += 1
                    self._new_round(now)
                else:
                    self._repair(now, False)  # holes the new blocks uncovered
        seq = seg.seq
        if acked >= 0 and (seq_lt(self._wl1, seq)
                           or (seq == self._wl1 and seq_le(self._wl2, ack))):
            if self.snd_wnd == 0 and wnd and self.state is not TIME_WAIT:
                # Persist is over. What went past the zero window (probes) was
                # dropped by the guest: send it again with the new data.
                self._cur_rto = self._rto
                self._timer = None
                if not self._fin_sent:
                    self.snd_nxt = self.snd_una
            self.snd_wnd = wnd
            self._wl1 = seq
            self._wl2 = ack
        if self.snd_wnd == 0:
            self._retries = 0  # the guest is alive: keep probing
        if fin_acked:
            self._transition("fin-acked", now)
            if self.state is CLOSED:
                return False
        if self._timer is None and (self.snd_nxt != self.snd_una or self._has_unsent()):
            self._timer = now + self._cur_rto
        return True

    def _receive(self, payload, seq, n, fin, now):
        """Data (and FIN) of an acceptable segment in a receiving state."""
        rcv_nxt = self.rcv_nxt
        old = seq_diff(rcv_nxt, seq)
        if old > 0:
            payload = payload[old:]
            n -= old
            seq = rcv_nxt
        room = seq_diff(self._rcv_adv, seq)
        if n > room:
            n = room if room > 0 else 0
            payload = payload[:n]
            fin = 0
            self._ack_owed = True
        if n and self.state is FIN_WAIT_2:
            self._idle_since = now  # the guest is still sending
        if seq == rcv_nxt:
            self._ack_owed = True
            if n:
                self._received.append(payload)
                self.rcv_nxt = (rcv_nxt + n) & MASK
                self.bytes_from_guest += n
                if self._ooo:
                    self._drain_ooo()
            if fin or self._ooo_fin == self.rcv_nxt:
                self._guest_fin(now)
        else:
            if n:
                self._store_ooo(payload, seq, n)
                self._ooo_last = seq
                self.counters["tcp-ooo-received"] += 1
            if fin:
                self._ooo_fin = (seq + n) & MASK
            self._emit(ACK, self.snd_nxt)  # duplicate ACK, at once

    def _store_ooo(self, payload, seq, n):
        """Keep the parts of an early segment not already held (copies).

        Past a hole, segments mostly arrive in order: each then extends the
        last piece (or starts one after it) without a walk of the list.
        """
        ooo = self._ooo
        if not ooo:
            ooo.append([seq, bytearray(payload)])
            return
        tail_seq, tail = ooo[-1]
        after = seq_diff(seq, (tail_seq + len(tail)) & MASK)
        if after == 0 and isinstance(tail, bytearray):
            tail += payload
            return
        if after > 0:
            ooo.append([seq, bytearray(payload)])
            return
        rcv = self.rcv_nxt
        start = seq_diff(seq, rcv)
        end = start + n
        pos = start
        new = []
        for s_seq, data in self._ooo:
            s = seq_diff(s_seq, rcv)
            e = s + len(data)
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                new.append([(rcv + pos) & MASK, bytes(payload[pos - start:s - start])])
            pos = e
            if pos >= end:
                break
        if pos < end:
            new.append([(rcv + pos) & MASK, bytes(payload[pos - start:])])
        if new:
            self._ooo.extend(new)
            self._ooo.sort(key=lambda piece: seq_diff(piece[0], rcv))
        elif self._sack_ok:
            self._dsack = (seq, (seq + n) & MASK)  # all held already

    def _drain_ooo(self):
        ooo = self._ooo
        rcv = self.rcv_nxt
        while ooo:
            s_seq, data = ooo[0]
            have = seq_diff(rcv, s_seq)
            if have < 0:
                break
            del ooo[0]
            if have < len(data):
                piece = data[have:] if have else data
                self._received.append(piece)
                rcv = (rcv + len(piece)) & MASK
                self.bytes_from_guest += len(piece)
        self.rcv_nxt = rcv

    def _guest_fin(self, now):
        self.rcv_nxt = (self.rcv_nxt + 1) & MASK
        self._ooo = []
        self._ooo_fin = None
        self._ack_owed = True
        self._transition("guest-fin", now)

    # -- sending

    def _has_unsent(self):
        if self._fin_sent:
            return False
        return len(self._sendbuf) > ((self.snd_nxt - self.snd_una) & MASK) or self._fin_queued

    def _push(self, now):
        """Send new data (and the FIN) as far as the window allows.

        Only called in _SENDING states, where a queued FIN means close() has
        taken effect.
        """
        self._more = False
        if self._fin_sent:
            return
        buf = self._sendbuf
        una = self.snd_una
        pos = (self.snd_nxt - una) & MASK  # bytes in flight
        end = len(buf)
        if not pos:
            self._progress = now  # the probe timeout counts from the first send
        if pos < end:
            limit = self.snd_wnd
            stop = end if end <= limit else limit
            mss = self.send_mss
            chunk = self._chunk()
            if stop > pos:
                tail = (stop - pos) % mss
                if stop < end and tail and (pos or stop - pos > tail):
                    stop -= tail  # no runt while an ACK is due to open the window
                cap = pos + self.params.burst_segments * chunk
                if stop > cap:
                    stop = cap  # the budget of this turn: the rest on the next
                    self._more = True
                if stop > pos:
                    lp = self.local_port
                    gp = self.guest_port
                    ack = self.rcv_nxt
                    wnd = self._window_field()
                    out = self._out
                    tsval = self._tsval if self._ts_ok else None
                    tsecr = self._ts_recent
                    self._last_ack_sent = ack
                    if self._rtt_seq is None and not self._in_recovery:
                        # (In recovery an ACK of it would wait for the holes.)
                        self._rtt_seq = (una + pos) & MASK
                        self._rtt_time = now
                        self._karn = False
                    while pos < stop:
                        nxt = pos + chunk if pos + chunk < stop else stop
                        out.append(TcpSegment(lp, gp, (una + pos) & MASK, ack, ACK,
                                              wnd, buf.slice(pos, nxt), None, None, None,
                                              tsval, tsecr))
                        pos = nxt
                    last = out[-1]
                    last.flags = ACK | PSH
                    if stop == end and self._fin_queued:
                        last.flags = ACK | PSH | FIN
                        self._fin_sent = True
                        stop += 1
                    self.snd_nxt = (una + stop) & MASK
                    self._ack_owed = False  # the data carries it
                    if self._sack_ok:
                        self._xmit_log.append((self.snd_nxt, now))
        if pos == end and self._fin_queued and not self._fin_sent:
            # A FIN needs no window room: receivers take it at the right edge.
            if self._rtt_seq is None:
                self._rtt_seq = self.snd_nxt
                self._rtt_time = now
            self._emit(ACK | FIN, self.snd_nxt)
            self._fin_sent = True
            self.snd_nxt = (self.snd_nxt + 1) & MASK
        if self._timer is None and (self.snd_nxt != una or self._has_unsent()):
            self._timer = now + self._cur_rto

    # -- loss recovery (RFC 6675 with the guest's SACK blocks, else NewReno)

    def _add_sack(self, edges, now):
        """Merge the guest's SACK blocks into the scoreboard; True if they
        covered data not SACKed before. Blocks outside (snd_una, snd_nxt] are
        ignored (D-SACKs and nonsense)."""
        una = self.snd_una
        top = seq_diff(self.snd_nxt, una)
        board = self._sacked
        before = self._sacked_bytes()
        if len(edges) >= 2:
            # D-SACK (RFC 2883): a first block below snd_una or inside the
            # second says a resend of ours was needless: wait longer.
            left = seq_diff(edges[0], una)
            right = seq_diff(edges[1], una)
            if right <= 0 or (len(edges) >= 4 and seq_diff(edges[2], una) <= left
                              and right <= seq_diff(edges[3], una)):
                self.counters["tcp-dsack-received"] += 1
                if self._reo_factor < 2.0:
                    self._reo_factor += 0.0625
        for i in range(0, len(edges) - 1, 2):
            left = seq_diff(edges[i], una)
            right = seq_diff(edges[i + 1], una)
            if left <= 0 or right <= left or right > top:
                continue
            # A round trip from data sent once: not from a hole resent this
            # round (its logged time is the first sending's).
            newly = (not (self._in_recovery and right <= seq_diff(self._rexmit_next, una))
                     and not any(seq_diff(l, una) < right <= seq_diff(r, una)
                                 for l, r in board))
            board.append([edges[i] & MASK, edges[i + 1] & MASK])
            sent = self._sent_time(right - 1) if newly else None
            if sent is not None:
                r = now - sent
                rack = self._rack_rtt
                self._rack_rtt = r if r > rack else rack - (rack - r) / 64
        if len(board) < 2:
            return self._sacked_bytes() > before
        board.sort(key=lambda b: seq_diff(b[0], una))
        merged = [board[0]]
        for block in board[1:]:
            last = merged[-1]
            if seq_le(block[0], last[1]):
                if seq_lt(last[1], block[1]):
                    last[1] = block[1]
            else:
                merged.append(block)
        self._sacked = merged
        return self._sacked_bytes() > before

    def _sacked_bytes(self):
        return sum(seq_diff(r, l) for l, r in self._sacked)

    def _prune_sacked(self, una):
        board = [b for b in self._sacked if seq_lt(una, b[1])]
        for block in board:
            if seq_lt(block[0], una):
                block[0] = una
        self._sacked = board

    def _sack_says_lost(self):
        """RFC 6675 IsLost for the first hole: DupThresh segments SACKed above it."""
        return bool(self._sacked) and \
            self._sacked_bytes() >= self.params.dup_threshold * self.send_mss

    def _new_round(self, now, all_lost=False):
        """Start (or restart) resending the holes from snd_una."""
        self._recover = self.snd_nxt
        self._round_end = self.snd_nxt
        self._round_time = now
        self._rexmit_next = self.snd_una
        self._repair(now, True, all_lost)

    def _partial_ack(self, ack, now):
        if not self._sack_ok:
            self._newreno_retransmit()  # the segment at the new snd_una
            return
        if seq_le(self._rexmit_next, ack):
            self._rexmit_next = ack
            self._repair(now, True)  # the hole at snd_una was not resent this round
        else:
            self._repair(now, False)

    def _reorder_wait(self):
        """How long after it left a segment may still be merely late: a
        quarter more than the longer of SRTT and the recent round trip of
        SACKed data (RACK's idea, RFC 8985: a hole is lost once data sent
        after it has been delivered and it is overdue by more than the
        reordering the link has shown)."""
        srtt = self._srtt or 0.0
        rack = self._rack_rtt
        return self._reo_factor * (srtt if srtt > rack else rack)

    def _sent_time(self, offset):
        """When the byte at ``offset`` past snd_una first left, or None."""
        una = self.snd_una
        for end, t in self._xmit_log:
            if seq_diff(end, una) > offset:
                return t
        return None

    def _repair(self, now, first, all_lost=False):
        """Resend the holes of this round: with ``first`` the one at
        ``_rexmit_next`` in any case (the ACKs say it is missing), then every
        hole with DupThresh segments SACKed above it (RFC 6675 IsLost; after
        an RTO, ``all_lost``: every hole below the highest SACK), each once a
        round, at most ``burst_segments`` segments. With SACK a hole must
        also have left more than ``_reorder_wait`` ago: on a link that
        reorders, a SACK above a hole is no proof that the hole is lost."""
        if not self._sack_ok:
            self._newreno_retransmit()
            return
        una = self.snd_una
        flight = (self.snd_nxt - una) & MASK
        data = flight - 1 if self._fin_sent else flight
        pos = seq_diff(self._rexmit_next, una)
        if pos < 0:
            pos = 0
        chunk = self._chunk()
        need = 0 if all_lost else self.params.dup_threshold * self.send_mss
        board = self._sacked
        above = self._sacked_bytes()
        budget = self.params.burst_segments
        buf = self._sendbuf
        sent = 0
        sent_by = now - self._reorder_wait() if not all_lost else now
        # Each hole ends where a SACKed block (or, last, snd_nxt) begins;
        # ``above`` is what the guest has SACKed beyond it.
        for left, right in board + [[self.snd_nxt, self.snd_nxt]]:
            lo = seq_diff(left, una)
            if lo > data:
                lo = data
            while pos < lo and sent < budget and (above >= need or (first and not sent)):
                left_at = self._sent_time(pos)
                if left_at is not None and left_at > sent_by:
                    # Lost by the count, maybe only late by the clock: look
                    # again once it is overdue.
                    due = left_at + (now - sent_by)
                    if self._reo_timer is None or due < self._reo_timer:
                        self._reo_timer = due
                    break
                n = lo - pos if lo - pos < chunk else chunk
                self._emit(ACK | PSH, (una + pos) & MASK, buf.slice(pos, pos + n))
                pos += n
                sent += 1
            if pos < lo:
                break  # not lost yet (nor any hole above it), or out of budget
            hi = seq_diff(right, una)
            if pos < hi:
                pos = hi
            above -= seq_diff(right, left)
        if first and not sent and pos >= data and self._fin_sent and flight:
            self._retransmit()  # only the FIN is missing
            sent = 1
        self._rexmit_next = (una + pos) & MASK
        if sent:
            self.counters["tcp-retransmits"] += sent
            self._rtt_seq = None  # Karn
            self._karn = True

    def _newreno_retransmit(self):
        """NewReno's resend of the first unacknowledged segment, counted."""
        if self.snd_nxt != self.snd_una:
            self._retransmit()
            self.counters["tcp-retransmits"] += 1

    def _retransmit(self):
        """Resend the first unacknowledged segment; returns its data length."""
        flight = (self.snd_nxt - self.snd_una) & MASK
        if not flight:
            return 0
        data = flight - 1 if self._fin_sent else flight
        chunk = self._chunk()
        n = data if data < chunk else chunk
        flags = ACK | PSH if n else ACK
        if self._fin_sent and n == data:
            flags |= FIN
        self._emit(flags, self.snd_una, self._sendbuf.slice(0, n))
        self._rtt_seq = None  # Karn; and a sample taken across a repair would be inflated
        self._karn = True
        return n

    def _chunk(self):
        """Payload bytes per emitted segment: the MSS, or a multiple of it with GSO."""
        mss = self.send_mss
        size = self.params.segment_size
        if size is None:
            return mss
        size -= self._ts_ok and TS_OPTION_LEN  # the GSO frame's headers grow too
        if size <= mss:
            return mss
        return size - size % mss

    def _probe(self):
        """Zero-window probe: one byte (resent if one is already out)."""
        buf = self._sendbuf
        flight = (self.snd_nxt - self.snd_una) & MASK
        if flight:
            if flight > len(buf):  # the FIN is out: it carries the probe
                self._retransmit()
                return
            self._emit(ACK, self.snd_una, buf.slice(0, 1))
        elif buf:
            self._emit(ACK, self.snd_nxt, buf.slice(0, 1))
            self.snd_nxt = (self.snd_nxt + 1) & MASK
        self._rtt_seq = None

    def _send_syn(self, now):
        """Our SYN (active open) or SYN-ACK; window fields of SYNs are never scaled."""
        p = self.params
        passive = self.state is SYN_RECEIVED
        self._tick(now)
        self._out.append(TcpSegment(
            self.local_port, self.guest_port, self.iss, self.rcv_nxt if passive else 0,
            SYN | ACK if passive else SYN, min(p.receive_window, 65535), b"",
            p.mss_limit,
            min(p.window_scale, 14) if (self._guest_wscale is not None or not passive)
            else None,
            self._sack_ok if passive else p.sack,
            self._tsval if (self._ts_ok if passive else p.timestamps) else None,
            self._ts_recent if passive else 0))
        if passive:
            self._rcv_adv = (self.rcv_nxt + min(p.receive_window, 65535)) & MASK
            self._last_ack_sent = self.rcv_nxt
        if self._rtt_seq is None and self._retries == 0:
            self._rtt_seq = self.iss
            self._rtt_time = now
        self._timer = now + self._cur_rto

    def _emit(self, flags, seq, payload=b""):
        """Queue one segment; with ACK it carries rcv_nxt and our current window."""
        if flags & ACK:
            self._ack_owed = False
            ack = self._last_ack_sent = self.rcv_nxt
            seg = TcpSegment(self.local_port, self.guest_port, seq, ack, flags,
                             self._window_field(), payload, None, None, None,
                             self._tsval if self._ts_ok else None, self._ts_recent)
            if (self._ooo or self._dsack) and self._sack_ok and not payload \
                    and not flags & RST:
                edges = self._sack_edges() if self._ooo else ()
                if self._dsack is not None:
                    edges = self._dsack + edges[:2 * self._sack_max - 2]
                    self._dsack = None
                seg.sack = edges
            self._out.append(seg)
        else:
            self._out.append(TcpSegment(self.local_port, self.guest_port, seq, 0, flags, 0,
                                        payload))

    def _sack_edges(self):
        """Our SACK blocks, flat: first the block holding the latest arrival
        (RFC 2018), then the others from the lowest, at most four in all."""
        blocks = []
        for s_seq, data in self._ooo:
            end = (s_seq + len(data)) & MASK
            if blocks and blocks[-1][1] == s_seq:
                blocks[-1][1] = end
            else:
                blocks.append([s_seq, end])
        last = self._ooo_last
        first = 0
        for i, (left, right) in enumerate(blocks):
            if seq_le(left, last) and seq_lt(last, right):
                first = i
                break
        edges = list(blocks[first])
        for i, block in enumerate(blocks):
            if i != first and len(edges) < 2 * self._sack_max:
                edges += block
        return tuple(edges)

    def _window_field(self):
        """The window to advertise, scaled; the right edge we accept never recedes.

        Rounding down to the scale's granularity may show the edge up to
        2**shift - 1 bytes short of what we accept (RFC 7323 appendix F);
        rounding up instead would creep the edge forward on every ACK.
        """
        shift = self.rcv_shift
        committed = seq_diff(self._rcv_adv, self.rcv_nxt)
        wnd = self.params.receive_window if self._receive_open else 0
        if committed > wnd:
            wnd = committed
        field = wnd >> shift
        if field > 65535:
            field = 65535
        edge = (self.rcv_nxt + (field << shift)) & MASK
        if seq_lt(self._rcv_adv, edge):
            self._rcv_adv = edge
        return field

    # -- helpers

    def _negotiate(self, guest_mss, guest_wscale, guest_tsval, now):
        """MSS, window scaling (RFC 7323: both or neither) and timestamps from
        the guest's SYN or SYN-ACK. With timestamps the send MSS, the payload
        of one segment, leaves room for their 12 bytes (as Linux's does)."""
        p = self.params
        mss = min(p.mss_limit, max(MIN_SND_MSS, guest_mss or _DEFAULT_MSS))
        if p.timestamps and guest_tsval is not None:
            self._ts_ok = True
            self._ts_recent = guest_tsval
            self._ts_recent_time = now
            self._sack_max = MAX_SACK_BLOCKS_TS
            mss -= TS_OPTION_LEN
        self.send_mss = mss
        self._guest_wscale = guest_wscale
        if guest_wscale is not None:
            self.snd_shift = min(guest_wscale, 14)
            self.rcv_shift = min(p.window_scale, 14)

    def _tick(self, now):
        """TSval for what leaves now: the offset plus ticks of ``now``, never
        going back (``now`` may be a wall clock that steps back, and the guest
        would drop our segments by PAWS)."""
        ms = int(now * self._ts_hz)
        if ms > self._ts_ms:
            self._ts_ms = ms
            self._tsval = (self._ts_offset + ms) & MASK

    def _ts_rtt_sample(self, tsecr, now):
        """An RTT sample from the echo of our TSval (RFC 7323 4.1): the time
        since the start of the tick it names, so never less than the true RTT
        and at most a tick more. An echo of the future or of long ago (a
        confused or hostile guest) is no sample."""
        ticks = now * self._ts_hz
        whole = int(ticks)
        delta = (self._ts_offset + whole - tsecr) & MASK
        if delta < 0x80000000:
            r = (delta + ticks - whole) / self._ts_hz
            if r <= self.params.rto_max:
                self.counters["tcp-rtt-from-timestamps"] += 1
                self._rtt_sample(r)

    def _rtt_sample(self, r):
        """RFC 6298 section 2."""
        p = self.params
        if r < 0:
            r = 0.0
        if self._srtt is None:
            self._srtt = r
            self._rttvar = r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r
        rto = self._srtt + max(0.001, 4 * self._rttvar)
        self._rto = min(max(rto, p.rto_min), p.rto_max)
