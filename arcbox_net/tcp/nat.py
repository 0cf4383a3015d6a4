"""TCP NAT: guest connections spliced onto host sockets.

Theory of operation
-------------------
Every guest TCP connection is terminated by a ``TcpConnection`` (the sans-I/O
state machine in ``connection.py``) and spliced onto a host socket opened
with a Twisted endpoint. ``TcpSplice`` is the glue for one connection: it is
the host socket's protocol, the producer the host transport pauses when its
buffer fills, and the owner of the connection's one timer.

Deferred SYN release: a guest SYN creates the connection in state HELD and
starts the host connect; nothing is sent to the guest until the connect's
Deferred fires. Success releases the SYN-ACK; failure becomes what a real
network would say (refused -> RST|ACK, unreachable -> ICMP with the matching
code, timeout -> ICMP host unreachable, policy -> ICMP admin prohibited).
A retransmitted SYN (same ISN) is absorbed by the held connection; a new ISN
on the same 4-tuple cancels the attempt and starts again.

Flow control, both ways bounded:
- guest -> host: the host transport pauses us (IPushProducer) above its
  buffer size; the connection then stops opening its receive window, so the
  guest can have at most one window in flight beyond that.
- host -> guest: host data waits in the connection's send buffer until the
  guest acknowledges it; above ``send_buffer_limit`` the host transport is
  paused (the kernel window to the host peer closes), below half it resumes.

Batching: segments of one read burst are fed to their connections, and each
touched connection is flushed once at the end of the burst (one cumulative
ACK, one host write, one timer update). A flush that used up its segment
budget is done again on the next reactor turn (``defer_flush``), after the
other connections and the link's reads.

Caps: ``max_connections`` in all, and ``max_half_open`` of the guest's
connections still opening (HELD or SYN_RECEIVED: each holds a host socket
that the guest has not yet earned), so a SYN flood from spoofed sources
gets RSTs instead of thousands of host connects.
"""

import errno
import random
import resource
import socket
import struct
from collections import Counter

import attrs
from twisted.internet import error as neterror
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..fdbudget import FdBudget
from ..interfaces import IFlushable, IIPv4Handler, IIPv6Handler
from ..policy import NO_ROUTE, Refusal
from ..wire import icmp, ip as ipfamily, ipv4, tcp
from ..wire.tcp import CONTROL_FLAGS, SYN
from .connection import (Closed, Established, GuestEndOfData, GuestReset, IllegalTransition,
                         Refused, TcpConnection, TcpParams, TcpState, TimedOut)

#: Bytes per host read (Twisted's bufferSize): eight 64 KiB GSO frames. With
#: glibc's mmap threshold raised (allocator.py) larger reads stopped costing
#: page faults; 512 KiB beat 256 KiB in alternating iperf3 runs (host->guest,
#: MTU 1500, 5 s): one stream 9.6-13.3 vs 7.8-9.1 Gbit/s, four 8.4-11.1 vs 7.4-7.8.
HOST_READ_SIZE = 512 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
#: Connections to the stack's own services (DNS over TCP) allowed beyond the
#: descriptor budget: each takes two descriptors of the reserve.
LOCAL_SERVICE_RESERVE = 8


@implementer(IIPv4Handler, IIPv6Handler, IFlushable)
class TcpNat:
    """The TCP handler of both IP families: owns the connection table. An
    IPv6 connection is the same state machine with 16-byte addresses and an
    MSS 20 bytes smaller (the larger header)."""

    log = Logger()
    ip_protocol = ipv4.PROTO_TCP

    def __init__(self, dispatcher, config, egress, reactor, params=None, fd_budget=None):
        self.dispatcher = dispatcher
        #: Host sockets the guest may still make us hold (fdbudget.py).
        self.fd_budget = fd_budget if fd_budget is not None else FdBudget()
        self.framer = dispatcher.framer
        self.config = config
        self.egress = egress
        self.reactor = reactor
        if params is None:
            # Where the link cuts segments for us (GSO), one emitted segment
            # carries up to 64 KiB; elsewhere one MSS.
            # The MSS fits the smaller of the configured MTU and the link's
            # largest plain frame: no TCP frame to the guest is ever larger.
            mtu = min(config.mtu, self.framer.mtu)
            params = TcpParams(mss_limit=mtu - 40, segment_size=self.framer.tcp_segment_limit,
                               fin_wait2_timeout=config.tcp_fin_timeout,
                               close_wait_timeout=config.tcp_close_wait_timeout,
                               timestamps=config.tcp_timestamps)
        self.params = params
        #: IPv6 connections: 20 more header bytes per segment, and their own GSO.
        self.params6 = attrs.evolve(params, mss_limit=params.mss_limit - 20,
                                    segment_size=self.framer.tcp_segment_limit6)
        self.connections = {}
        #: Guest-opened connections not yet established (HELD, SYN_RECEIVED):
        #: each holds a host socket, so they have a cap of their own.
        self.half_open = 0
        self._dirty = []
        #: Splices whose last flush hit its segment budget, and the call
        #: that flushes them again on the next reactor turn.
        self._backlog = []
        self._backlog_call = None
        self.drops = Counter()
        self.counters = Counter()
        #: Callable(kind, details) told of "connection-opened"/"connection-closed".
        self.on_event = None
        #: Inbound (forwarded) connections: gentler SYN retries than a host.
        self.inbound_params = attrs.evolve(self.params, syn_retries=2, rto_initial=0.5)
        self.inbound_params6 = attrs.evolve(self.params6, syn_retries=2, rto_initial=0.5)

    # -- lifecycle

    def start(self):
        _raise_fd_limit()

    def stop(self):
        if self._backlog_call is not None and self._backlog_call.active():
            self._backlog_call.cancel()
        self._backlog_call = None
        self._backlog = []
        for splice in list(self.connections.values()):
            splice.abort_all()
        self.connections.clear()

    # -- guest side

    def handle_ipv4(self, frame, ip):
        seg = tcp.parse(frame, ip)
        key = (ip.src, seg.src_port, ip.dst, seg.dst_port)
        splice = self.connections.get(key)
        if splice is not None and seg.flags & CONTROL_FLAGS == SYN and splice.replaced_by(seg):
            splice.abort_all()
            splice = None
        if splice is None:
            if seg.flags & CONTROL_FLAGS == SYN:
                self._open(key, seg, frame, ip)
            else:
                self._reset_unmatched(key, seg)
            return
        try:
            splice.conn.segment_received(seg, self.reactor.seconds())
        except IllegalTransition as e:
            # Our bug, never the guest's doing: drop the segment, keep the stack up.
            self.drops["tcp-illegal-input"] += 1
            self.log.error("TCP {conn!r}: segment dropped: {error}", conn=splice.conn, error=e)
        if not splice.dirty:
            splice.dirty = True
            self._dirty.append(splice)

    handle_ipv6 = handle_ipv4

    def flush(self):
        if not self._dirty:
            return
        now = self.reactor.seconds()
        dirty, self._dirty = self._dirty, []
        for splice in dirty:
            splice.dirty = False
            splice.pump(now)

    def defer_flush(self, splice):
        """Flush ``splice`` again on the next reactor turn (its budget ran out):
        the other connections and the link's reads get their turn first."""
        if splice.deferred:
            return
        splice.deferred = True
        self._backlog.append(splice)
        self.counters["tcp-flush-deferred"] += 1
        if self._backlog_call is None:
            self._backlog_call = self.reactor.callLater(0, self._flush_backlog)

    def _flush_backlog(self):
        self._backlog_call = None
        backlog, self._backlog = self._backlog, []
        now = self.reactor.seconds()
        for splice in backlog:
            splice.deferred = False
            if not splice._finished:
                splice.pump(now)

    def _reset_unmatched(self, key, seg):
        reply = TcpConnection.reset_for(seg)
        if reply is None:
            self.drops["tcp-unmatched-rst"] += 1
            return
        self.drops["tcp-no-connection"] += 1
        self.emit(key, reply)

    def _open(self, key, seg, frame, ip):
        guest_ip, guest_port, remote_ip, remote_port = key
        quote = ipfamily.quote(frame, ip)
        if len(self.connections) >= self.config.max_connections:
            self.drops["tcp-connection-limit"] += 1
            self.emit(key, TcpConnection.reset_for(seg))
            return
        if self.half_open >= self.config.max_half_open:
            self.drops["tcp-half-open-limit"] += 1
            self.emit(key, TcpConnection.reset_for(seg))
            return
        target = self.egress.route(remote_ip, remote_port)
        if isinstance(target, Refusal):
            self.drops["tcp-" + target.reason] += 1
            if target is NO_ROUTE:
                # The gateway itself refuses, as a host without the port would.
                self.emit(key, TcpConnection.reset_for(seg))
            else:
                self.send_icmp_error(key, quote, target.icmp_code)
            return
        if self.fd_budget.room() <= 0 and not self._may_use_reserve(remote_ip, remote_port):
            self.drops["tcp-fd-exhausted"] += 1
            self.emit(key, TcpConnection.reset_for(seg))
            return
        conn = TcpConnection.from_guest_syn(seg, self.reactor.seconds(), random.getrandbits(32),
                                            self.params6 if len(guest_ip) == 16 else self.params)
        conn.counters = self.counters
        splice = TcpSplice(self, key, conn, quote, target)
        splice.half_open = True
        self.half_open += 1
        self.connections[key] = splice
        self.counters["tcp-opened"] += 1
        if self.on_event is not None:
            self.on_event("connection-opened", splice.describe())
        splice.connect()

    def _may_use_reserve(self, remote_ip, remote_port):
        """A service the stack runs itself (DNS over TCP) stays reachable with
        the guest's descriptors used up, for a few connections at once."""
        if (remote_ip, remote_port) not in self.egress.local_services:
            return False
        local = sum(1 for s in self.connections.values()
                    if (s.key[2], s.key[3]) in self.egress.local_services)
        return local < LOCAL_SERVICE_RESERVE

    # -- the way out

    def emit(self, key, seg, mss=0):
        """Send ``seg`` to the guest; ``mss`` > 0 lets a longer payload leave
        as one GSO frame cut into segments of that size where the link can."""
        guest_ip, _gport, remote_ip, _rport = key
        if seg.flags & SYN:
            options = tcp.syn_options(seg.mss, seg.wscale, seg.sack, seg.tsval, seg.tsecr)
        elif seg.sack:
            options = tcp.sack_option(seg.sack, seg.tsval, seg.tsecr)
        elif seg.tsval is not None:  # timestamps (RFC 7323): every segment, one pack
            options = tcp.ts_option(seg.tsval, seg.tsecr)
        else:
            options = b""
        self.framer.send_tcp(remote_ip, guest_ip, seg.src_port, seg.dst_port, seg.seq, seg.ack,
                             seg.flags, seg.window, seg.payload, options, mss)

    def send_icmp_error(self, key, quote, code):
        guest_ip, _gport, remote_ip, _rport = key
        self.framer.send_icmp_error(remote_ip, guest_ip, icmp.TYPE_DEST_UNREACH, code, quote)

    def forget(self, splice):
        if self.connections.get(splice.key) is splice:
            del self.connections[splice.key]
            self.counters["tcp-closed"] += 1
            if self.on_event is not None:
                self.on_event("connection-closed", splice.describe())

    # -- port forwarding: connections the host opens to the guest

    def inbound_factory(self, forward):
        """A protocol factory for a forward's host listener."""
        return _InboundFactory(self, forward)

    def free_port(self, guest_ip, guest_port, src_ip, preferred=None):
        """A source port for a connection to the guest not used by another one."""
        if preferred and (guest_ip, guest_port, src_ip, preferred) not in self.connections:
            return preferred
        for _ in range(64):
            port = random.randint(32768, 60999)
            if (guest_ip, guest_port, src_ip, port) not in self.connections:
                return port
        return None

    # -- introspection

    def flows(self):
        now = self.reactor.seconds()
        return [splice.describe(now) for splice in self.connections.values()]


def _target_str(target):
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IHalfCloseableProtocol, IPushProducer)
class TcpSplice(Protocol):
    """One guest connection and its host socket."""

    log = Logger()
    #: "outbound" (the guest connected out) or "inbound" (a port forward).
    direction = "outbound"

    def __init__(self, nat, key, conn, quote, target):
        self.nat = nat
        self.key = key
        self.conn = conn
        self.quote = quote
        self.target = target
        self.dirty = False
        self.deferred = False
        #: Counted in the NAT's half-open connections (until Established or the end).
        self.half_open = False
        self.transport = None
        self._connecting = None
        self._timer = None
        self._host_paused = False
        self._host_eof = False
        self._host_closed = False   # the host transport's connectionLost has run
        self._producer_registered = False
        self._finished = False
        self._syn_seq = conn.irs if conn is not None else None

    def describe(self, now=None):
        gip, gport, rip, rport = self.key
        conn = self.conn
        if now is None:
            now = self.nat.reactor.seconds()
        return {
            "protocol": "tcp", "direction": self.direction,
            "guest": ipfamily.endpoint_str(gip, gport),
            "remote": ipfamily.endpoint_str(rip, rport),
            "host": _target_str(self.target) if self.target else None,
            "state": conn.state.name if conn is not None else "LISTEN",
            "bytes_from_guest": conn.bytes_from_guest if conn is not None else 0,
            "bytes_to_guest": conn.bytes_to_guest if conn is not None else 0,
            "age": round(now - conn.created_at, 3) if conn is not None else 0,
        }

    # -- connect (deferred SYN release)

    def connect(self):
        """The host connect, straight through ``reactor.connectTCP``: the
        target is always a literal address, so an endpoint's resolution and
        its Deferred and wrapping-protocol layers would only cost time on
        every connection (the connection rate is per-connection overhead)."""
        nat = self.nat
        self._connecting = nat.reactor.connectTCP(self.target[0], self.target[1],
                                                  _SpliceClientFactory(self),
                                                  timeout=nat.config.connect_timeout)

    def replaced_by(self, syn):
        """Should a new SYN on our 4-tuple replace this connection?"""
        state = self.conn.state
        if state is TcpState.HELD:
            return syn.seq != self._syn_seq
        return state in (TcpState.TIME_WAIT, TcpState.CLOSED)

    def _connected(self):
        self._connecting = None
        if self._finished:
            return
        self.conn.accept(self.nat.reactor.seconds())
        self.pump()

    def _connect_failed(self, failure):
        self._connecting = None
        if self._finished:
            return None
        nat = self.nat
        if failure.check(neterror.ConnectingCancelledError) \
                or type(failure.value) is neterror.UserError:   # our stopConnecting()
            return None
        if failure.check(neterror.ConnectionRefusedError):
            nat.counters["tcp-refused"] += 1
            self.conn.reset()  # the RST|ACK the host would have sent
        else:
            code = _icmp_code_for(failure)
            nat.counters["tcp-connect-failed"] += 1
            if code is None:
                self.conn.reset()
            else:
                nat.send_icmp_error(self.key, self.quote, code)
                self.conn.reset(rst=False)  # the ICMP error says it all
        self.pump()  # Closed: _finish
        return None

    # -- host transport (IProtocol / IHalfCloseableProtocol)

    def connectionMade(self):
        transport = self.transport
        try:
            transport.setTcpNoDelay(True)
        except Exception:
            pass
        # One host read should fill several 64 KiB GSO frames (Twisted reads
        # bufferSize bytes per wakeup; it is also the write-side threshold at
        # which the transport pauses us, i.e. the guest).
        transport.bufferSize = HOST_READ_SIZE
        transport.registerProducer(self, True)
        self._producer_registered = True
        if self._connecting is not None:
            self._connected()     # the SYN-ACK the guest waits for

    def dataReceived(self, data):
        conn = self.conn
        conn.send(data)
        self.pump()
        if not self._host_paused and conn.send_buffered >= self.nat.params.send_buffer_limit:
            self._host_paused = True
            self.transport.pauseProducing()

    def readConnectionLost(self):
        """Host EOF: FIN to the guest once the pending data is out."""
        self._host_eof = True
        self.conn.close(self.nat.reactor.seconds())
        self.pump()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if self._finished:
            return
        if self.conn.is_closed:
            self._finish()
            return
        if self._host_eof:
            pass  # readConnectionLost has closed our side already
        elif reason.check(neterror.ConnectionDone):
            self.conn.close(self.nat.reactor.seconds())
        else:
            self.nat.counters["tcp-host-reset"] += 1
            self.conn.reset()
        # Before pump: the events it emits must not touch the closed transport.
        self._host_closed = True
        self.pump()

    # -- IPushProducer: the host transport asks us to slow the guest down

    def pauseProducing(self):
        self.conn.set_receive_open(False, self.nat.reactor.seconds())

    def resumeProducing(self):
        self.conn.set_receive_open(True, self.nat.reactor.seconds())
        self.pump()

    def stopProducing(self):
        pass

    # -- moving things along

    def pump(self, now=None):
        """Flush the connection, send what it produced, write guest data, act on events."""
        conn = self.conn
        nat = self.nat
        conn.flush(nat.reactor.seconds() if now is None else now)
        segments = conn.take_segments()
        received = conn.take_received()
        if received:
            # The host first: its answer is what the guest waits for, and the
            # ACK frame (a TAP write running the guest's receive path) can go
            # while the host works on it.
            transport = self.transport
            if transport is not None and not self._host_closed:
                _write_host(transport, received)
            else:
                # The host socket is gone: as a real host would, reset
                # (unless a guest RST later in the batch ended it already).
                if not conn.is_closed:
                    conn.reset()
                    segments += conn.take_segments()
        mss = conn.send_mss
        for seg in segments:
            nat.emit(self.key, seg, mss)
        for event in conn.take_events():
            self._on_event(event)
        if self._host_paused and self.transport is not None \
                and conn.send_buffered < nat.params.send_buffer_limit // 2:
            self._host_paused = False
            self.transport.resumeProducing()
        self._schedule()
        if conn.wants_flush and not self._finished:
            nat.defer_flush(self)

    def _on_event(self, event):
        transport = self.transport
        if isinstance(event, GuestEndOfData):
            if transport is not None and not self._host_closed:
                if self._producer_registered:
                    self._producer_registered = False
                    transport.unregisterProducer()
                transport.loseWriteConnection()
        elif isinstance(event, GuestReset):
            self.nat.counters["tcp-idle-timeout" if event.reason == "idle"
                              else "tcp-guest-reset"] += 1
            self._reset_host()
        elif isinstance(event, Closed):
            self._finish()
        elif isinstance(event, Established):
            self.nat.counters["tcp-established"] += 1
            self._opened()
            if self.direction == "inbound" and transport is not None:
                transport.resumeProducing()
        elif isinstance(event, Refused):
            self.nat.counters["tcp-forward-refused"] += 1
            self._reset_host()
        elif isinstance(event, TimedOut):
            self.nat.counters["tcp-forward-timeout"] += 1
            if transport is not None:
                transport.abortConnection()

    def _opened(self):
        """No longer half-open (established, or over)."""
        if self.half_open:
            self.half_open = False
            self.nat.half_open -= 1

    def _reset_host(self):
        transport = self.transport
        if transport is None or self._host_closed:
            return
        try:
            transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except Exception:
            pass
        transport.abortConnection()

    def _schedule(self):
        if self._finished:
            return
        deadline = self.conn.next_deadline()
        timer = self._timer
        if deadline is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
            return
        delay = max(0.0, deadline - self.nat.reactor.seconds())
        if timer is not None and timer.active():
            if abs(timer.getTime() - deadline) > 0.001:
                timer.reset(delay)
        else:
            self._timer = self.nat.reactor.callLater(delay, self._on_timer)

    def _on_timer(self):
        self._timer = None
        if self._finished:
            return
        self.conn.on_timer(self.nat.reactor.seconds())
        self.pump()

    def _finish(self):
        if self._finished:
            return
        self._finished = True
        self._opened()
        self.nat.forget(self)
        timer = self._timer
        if timer is not None and timer.active():
            timer.cancel()
        self._timer = None
        if self._connecting is not None:
            connector, self._connecting = self._connecting, None
            try:
                connector.stopConnecting()
            except neterror.NotConnectingError:
                pass
        transport = self.transport
        if transport is not None and not self._host_closed:
            transport.loseConnection()

    def abort_all(self):
        """Drop this connection without telling the guest (replaced or shutting down)."""
        conn = self.conn
        if conn is not None and not conn.is_closed:
            conn.reset(rst=False)
        self._reset_host()
        self._finish()


def _twisted_buffer_empty(transport):
    """True for a connected Twisted TCP transport with nothing queued to write."""
    try:
        return ((not transport.dataBuffer or len(transport.dataBuffer) == transport.offset)
                and not transport._tempDataBuffer and transport.connected
                and not transport.disconnecting and transport.socket is not None)
    except AttributeError:  # another kind of transport: use its write()
        return False


def _write_host(transport, buffers):
    """Write guest data to the host socket, straight away when Twisted holds none.

    Twisted's transport.write takes only bytes (a copy of each memoryview)
    and always goes through its buffer; sendmsg of the payload views skips
    both when nothing is queued ahead (about a third faster guest -> host).
    Whatever the kernel does not take goes to transport.write as usual, so
    ordering, producer pausing and errors stay Twisted's business.
    """
    if len(buffers) > 512:  # sendmsg takes at most IOV_MAX (1024) buffers
        buffers = [b"".join(buffers)]
    if _twisted_buffer_empty(transport):
        try:
            sent = transport.socket.sendmsg(buffers)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # let Twisted meet the error on its own write
        total = 0
        for i, buf in enumerate(buffers):
            n = len(buf)
            if sent < total + n:
                rest = [bytes(buf[sent - total:]) if sent > total else bytes(buf)]
                rest.extend(bytes(b) for b in buffers[i + 1:])
                transport.write(b"".join(rest))
                return
            total += n
        return
    transport.write(b"".join(buffers))


class InboundSplice(TcpSplice):
    """A host client of a port forward, relayed to the guest by an active open."""

    direction = "inbound"

    def __init__(self, nat, forward, client):
        super().__init__(nat, None, None, b"", (client.host, client.port))
        self.forward = forward
        self.client = client

    def connectionMade(self):
        nat = self.nat
        forward = self.forward
        guest = forward.guest_address()
        guest_ip = guest.packed
        guest_port = forward.guest_port
        src_ip, preferred = forward.source_for(self.client, guest)
        src_port = nat.free_port(guest_ip, guest_port, src_ip, preferred)
        # Not held to the guest's descriptor budget: the client is a host
        # program, already accepted (from the reserve the budget keeps).
        if src_port is None or len(nat.connections) >= nat.config.max_connections:
            nat.drops["tcp-forward-no-slot"] += 1
            self.transport.abortConnection()
            self._finished = True
            return
        self.key = (guest_ip, guest_port, src_ip, src_port)
        # Not a byte from the client until the guest has accepted.
        self.transport.pauseProducing()
        super().connectionMade()
        self.conn = TcpConnection.open_to_guest(
            src_port, guest_port, nat.reactor.seconds(), random.getrandbits(32),
            nat.inbound_params6 if guest.version == 6 else nat.inbound_params)
        self.conn.counters = nat.counters
        nat.connections[self.key] = self
        nat.counters["tcp-forward-opened"] += 1
        if nat.on_event is not None:
            nat.on_event("connection-opened", self.describe())
        self.pump()

    def connectionLost(self, reason):
        if self.conn is None:
            return
        super().connectionLost(reason)

    def replaced_by(self, syn):
        return self.conn.state in (TcpState.TIME_WAIT, TcpState.CLOSED)


class _InboundFactory(Factory):
    noisy = False

    def __init__(self, nat, forward):
        self.nat = nat
        self.forward = forward

    def buildProtocol(self, addr):
        return InboundSplice(self.nat, self.forward, addr)


class _SpliceClientFactory(ClientFactory):
    """Hands the connector our splice and its failure; quiet, as there is
    one per connection."""

    noisy = False

    def __init__(self, splice):
        self.splice = splice

    def buildProtocol(self, addr):
        return self.splice

    def clientConnectionFailed(self, connector, reason):
        self.splice._connect_failed(reason)


def _icmp_code_for(failure):
    """The ICMP unreachable code for a failed host connect, or None for RST."""
    if failure.check(neterror.TimeoutError, neterror.TCPTimedOutError):
        return icmp.CODE_HOST_UNREACH
    if failure.check(neterror.NoRouteError):
        return icmp.CODE_NET_UNREACH
    os_error = getattr(failure.value, "osError", None)
    if isinstance(os_error, int):
        if os_error == errno.EHOSTUNREACH:
            return icmp.CODE_HOST_UNREACH
        if os_error == errno.ENETUNREACH:
            return icmp.CODE_NET_UNREACH
        if os_error in (errno.EACCES, errno.EPERM):
            return icmp.CODE_ADMIN_PROHIBITED
    return None


def _raise_fd_limit():
    """Each connection holds a host fd: allow as many as the hard limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
