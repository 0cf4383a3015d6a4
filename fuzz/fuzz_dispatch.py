"""Coverage-guided fuzzing of the dispatch entry point (atheris / libFuzzer).

One ``NetworkStack``, wired as the real one is (ARP, DHCP, ICMP, DNS, the
TCP/UDP/ICMP NAT, and whatever IPv6 parts the stack registers), lives for the
whole run and takes every input, as a stack takes a guest's frames for its
whole life: state that leaks across inputs shows as RSS growth. Nothing
touches the host's network: the reactor is a ``MemoryReactorClock`` whose
``connectTCP`` only records the attempt, the UDP NAT's host sockets, the ICMP
NAT's backend and the DNS upstream are stand-ins, and the link is a recorder.

An input is a short program of steps, each ``op (1 byte) | length (2 bytes,
big-endian) | body``: frames from the guest (consecutive ones are one batch,
as one read wakeup), floods (a frame FLOOD times, from made-up clients or
flows: ``vary``), and the host's side of things (connects succeed or fail,
host data, EOF or reset, UDP and ICMP replies, DNS answers, time passing).
A structure-blind mutation still yields frames; steps let the fuzzer drive
handshakes and NAT replies too, and floods fill the stack's tables. Python's
``random`` is reseeded per input, so the ISN of the first connection an input
opens is known (the seeds complete a handshake with it).

What counts as a crash (the exception escapes to libFuzzer): a handler that
raised (``handler-error``, which the dispatcher would otherwise swallow) or
an illegal TCP transition; a frame to the guest larger than the link takes,
not from the gateway MAC, or with a wrong IPv4 length or checksum; a timer
that fires STORM times in one advance of the clock; a NAT cap exceeded; RSS
more than ``RSS_BOUND`` above its level after warm-up (exit status 3).

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_dispatch.py --write-seeds /tmp/corpus
    nice -n 10 .venv/bin/python fuzz/fuzz_dispatch.py -atheris_runs=1000001 /tmp/corpus

``one_input`` and ``seed_inputs`` import without atheris: the unit test
tests/unit/test_fuzz_dispatch.py runs the seeds through the same code.
"""

import array
import errno
import os
import random
import struct
import sys

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GATEWAY_MAC = b"\x02\xab\xcb\x00\x00\x01"
#: A documentation address (TEST-NET-3) the guest "reaches"; mapped onto
#: loopback like the tests do, though no socket is ever opened here.
REMOTE = "203.0.113.10"
REMOTE6 = "2001:db8::7"

# Step opcodes (the low 3 bits of the op byte).
OP_FRAME = 0
OP_CONNECT = 1   # settle pending host connects: body bytes pick the outcome of each
OP_HOST_DATA = 2  # body[0] picks an open host connection, body[1:] is what the host sends
OP_HOST_CLOSE = 3  # body[0] picks one, body[1] & 1: reset instead of EOF
OP_CLOCK = 4     # advance the clock by body (big-endian) milliseconds
OP_UDP_REPLY = 5  # body[0] picks a UDP flow; & 0x80: an ICMP error (body[1], body[2])
OP_ICMP_REPLY = 6  # body[0] picks an echo flow; & 0x80: an ICMP error
OP_DNS = 7       # body bytes: the outcome of each pending upstream query
#: OP_FRAME with the op byte's top bit: the frame FLOOD times, each from a
#: new client or flow (``vary``).
OP_FLOOD = 8
FLOOD = 32
MAX_STEPS = 24
#: Times one timer may fire in one advance of the clock before it is a storm.
STORM = 5000
#: Virtual seconds every input takes (connect timeouts, RTOs, expiry move on).
TICK = 0.1

#: Inputs before the RSS baseline is taken, and the growth allowed after it.
#: The stack's tables fill during warm-up (DHCP bindings, neighbours, flows,
#: the DNS cache, rate limiter keys: all capped); after it RSS may move only
#: by what the allocator keeps (measured, docs/security.md "Fuzzing").
WARMUP = 100_000
RSS_BOUND = 64 * 1024 * 1024
CHECK_EVERY = 10_000


def rss_bytes():
    """Resident set size now (not the peak), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ones(data):
    """One's-complement sum, word by word: independent of wire/checksum.py."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    words = array.array("H", bytes(data))
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class BadFrame(AssertionError):
    """The stack sent the guest a frame it must never send."""


def check_frame(frame, max_frame):
    """What every frame to the guest must be, whatever the guest sent."""
    if len(frame) > max_frame:
        raise BadFrame(f"{len(frame)}-byte frame on a link of {max_frame}")
    if len(frame) < 14 or frame[6:12] != GATEWAY_MAC:
        raise BadFrame(f"frame not from the gateway MAC: {frame[:14].hex()}")
    etype = (frame[12] << 8) | frame[13]
    if etype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        total = (frame[16] << 8) | frame[17]
        if frame[14] >> 4 != 4 or ihl < 20 or 14 + total != len(frame):
            raise BadFrame(f"IPv4 length {total} in a {len(frame)}-byte frame")
        if _ones(frame[14:14 + ihl]) != 0xFFFF:
            raise BadFrame("bad IPv4 header checksum")
        frag = (frame[20] << 8) | frame[21]
        if frag & 0x3FFF:
            return  # a fragment: its L4 checksum covers the whole datagram
        proto = frame[23]
        l4 = frame[14 + ihl:]
        if proto in (6, 17):
            if proto == 17 and l4[6:8] == b"\x00\x00":
                return
            pseudo = frame[26:34] + bytes((0, proto)) + len(l4).to_bytes(2, "big")
            if _ones(pseudo + l4) != 0xFFFF:
                raise BadFrame(f"bad {'TCP' if proto == 6 else 'UDP'} checksum")
        elif proto == 1 and _ones(l4) != 0xFFFF:
            raise BadFrame("bad ICMP checksum")
    elif etype == 0x86DD:
        if len(frame) < 54 or 54 + ((frame[18] << 8) | frame[19]) != len(frame):
            raise BadFrame("IPv6 payload length does not match the frame")
        nh = frame[20]
        if nh in (6, 17, 58):
            l4 = frame[54:]
            pseudo = frame[22:54] + len(l4).to_bytes(4, "big") + bytes((0, 0, 0, nh))
            if _ones(pseudo + l4) != 0xFFFF:
                raise BadFrame(f"bad IPv6 {({6: 'TCP', 17: 'UDP', 58: 'ICMPv6'})[nh]} checksum")


class FuzzLink:
    """The guest link: checks every frame to the guest, keeps the last input's."""

    description = "fuzz"

    def __init__(self, mtu=1500):
        from arcbox_net.interfaces import LinkCapabilities
        self.mtu = mtu
        self.capabilities = LinkCapabilities.plain(mtu)
        #: As ``--netns --configure`` does: the configured guest address is this MAC's.
        self.guest_mac = GUEST_MAC
        self.frames = []
        self.frames_out = 0

    def start(self, sink):
        self.sink = sink

    def stop(self):
        pass

    def send_frame(self, frame, vnet_header=None):
        if vnet_header is not None:
            raise BadFrame("offload metadata on a link that declared none")
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            frame = b"".join(bytes(b) for b in frame)
        frame = bytes(frame)
        check_frame(frame, self.capabilities.max_frame)
        self.frames_out += 1
        self.frames.append(frame)


class HostTransport:
    """The host socket of one NATed TCP connection: counts what is written."""

    def __init__(self, meter=None):
        self.protocol = None
        self.meter = meter
        self.written = 0
        self.paused = False
        self.disconnecting = False
        self.write_closed = False
        self.producer = None
        self.bufferSize = 65536

    def write(self, data):
        if self.disconnecting or self.write_closed:
            raise BadFrame("write to a closed host transport")
        self.written += len(data)
        if self.meter is not None:
            self.meter.host_written += len(data)

    def writeSequence(self, seq):
        for data in seq:
            self.write(data)

    def setTcpNoDelay(self, enabled):
        pass

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.loseConnection()

    def loseWriteConnection(self):
        self.write_closed = True

    def loseConnection(self):
        self.disconnecting = True

    abortConnection = loseConnection

    def getHost(self):
        from twisted.internet.address import IPv4Address
        return IPv4Address("TCP", "127.0.0.1", 40000)

    getPeer = getHost


def _fuzz_reactor():
    from twisted.internet import error
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, _FakeConnector
    from twisted.python.failure import Failure

    class Connector(_FakeConnector):
        """As Twisted's: stopConnecting fails the attempt at once (UserError)."""

        factory = None
        #: Connected or failed: no longer connecting.
        done = False

        def stopConnecting(self):
            if self.done or self.stoppedConnecting:
                raise error.NotConnectingError()
            super().stopConnecting()
            self.done = True
            self.factory.clientConnectionFailed(self, Failure(error.UserError()))

    class FuzzReactor(MemoryReactorClock):
        """connectTCP records the attempt (with its deadline) and nothing else."""

        def __init__(self):
            super().__init__()
            self.pending = []

        def advance(self, amount):
            """Clock.advance, but a timer that fires STORM times in one advance
            (a deadline left in the past: callLater(0) for ever, which a real
            reactor would spin on at 100 % CPU) is a crash, with its name."""
            self.rightNow += amount
            self._sortCalls()
            fired = {}
            while self.calls and self.calls[0].getTime() <= self.seconds():
                call = self.calls.pop(0)
                call.called = 1
                key = (getattr(call.func, "__qualname__", repr(call.func)),
                       id(getattr(call.func, "__self__", None)))
                fired[key] = fired.get(key, 0) + 1
                if fired[key] > STORM:
                    owner = getattr(call.func, "__self__", None)
                    detail = repr(getattr(owner, "conn", owner))
                    raise AssertionError(f"timer storm: {key[0]} fired {STORM} times in one "
                                         f"advance of {amount} s at {self.rightNow}: {detail}")
                call.func(*call.args, **call.kw)
                self._sortCalls()

        def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
            connector = Connector(IPv4Address("TCP", host, port))
            connector.factory = factory
            factory.startedConnecting(connector)
            self.pending.append((self.seconds() + timeout, host, port, factory, connector))
            return connector

    return FuzzReactor()


class FakeUdpSocket:
    """The UDP NAT's host socket of one flow."""

    def __init__(self, nat, flow):
        self.nat = nat
        self.flow = flow
        self.sent = 0
        self.closed = False
        self.address = ("127.0.0.1", 50000)

    def send(self, data):
        if self.closed:
            raise BadFrame("send on a closed UDP flow socket")
        self.sent += 1

    def close(self):
        self.closed = True


class FakeIcmpBackend:
    """The ICMP NAT's way out: remembers each flow's last request."""

    name = "fuzz"

    def __init__(self):
        self.flows = {}
        self.next_id = 0

    def open(self, flow):
        self.next_id = self.next_id % 65535 + 1
        flow.host_id = self.next_id
        self.flows[id(flow)] = [flow, b""]

    def send(self, flow, message):
        entry = self.flows.get(id(flow))
        if entry is not None:
            entry[1] = message

    def close(self, flow):
        self.flows.pop(id(flow), None)

    def stop(self):
        self.flows.clear()


class FakeUpstream:
    """The DNS upstream: every query waits until an OP_DNS step (or the
    proxy's deadline) settles it."""

    def __init__(self):
        self.pending = []

    def query(self, q, timeout=None):
        from twisted.internet import defer
        d = defer.Deferred()
        self.pending.append((q, d))
        return d


class Harness:
    """The stack and its fake surroundings; ``run(data)`` is one input."""

    def __init__(self):
        from twisted.logger import globalLogPublisher

        from arcbox_net.config import StackConfig
        from arcbox_net.dispatch import FrameDispatcher
        from arcbox_net.stack import NetworkStack

        self.reactor = reactor = _fuzz_reactor()
        self.config = StackConfig(
            address_map=[f"{REMOTE}=127.0.0.2", f"{REMOTE6}=::1"], deny=["0.0.0.0/0", "::/0"],
            allow=["127.0.0.0/8", "::1/128"],
            dns_upstreams=["127.0.0.1:53"], dns_records=["fuzz.test=10.0.2.9"])

        class Dispatcher(FrameDispatcher):
            def __init__(self, config, link):
                super().__init__(config, link, clock=reactor.seconds)

        class Stack(NetworkStack):
            dispatcher_class = Dispatcher

        self.link = FuzzLink(self.config.mtu)
        self.stack = stack = Stack(self.link, self.config, reactor=reactor)
        self.dispatcher = stack.dispatcher
        self.udp_sockets = []

        def udp_socket(nat, flow):
            sock = FakeUdpSocket(nat, flow)
            self.udp_sockets.append(sock)
            return sock
        stack.udp.socket_factory = udp_socket
        self.icmp_backend = FakeIcmpBackend()
        stack.icmp.forward.mode = self.icmp_backend
        self.upstream = FakeUpstream()
        stack.dns.proxy.upstream._resolver = self.upstream
        self.host_conns = []
        self.host_written = 0
        self.failures = []
        self._observer = self._watch_log
        globalLogPublisher.addObserver(self._observer)
        stack.startService()
        self.inputs = 0
        self.serial = 0

    def close(self):
        from twisted.logger import globalLogPublisher
        globalLogPublisher.removeObserver(self._observer)
        self.stack.stopService()

    def _watch_log(self, event):
        failure = event.get("log_failure")
        if failure is not None:
            self.failures.append(failure.getTraceback())
            del self.failures[:-3]

    # -- one input

    def run(self, data):
        self.inputs += 1
        random.seed(0)
        self.link.frames = []
        drops = self.dispatcher.drops
        errors_before = drops["handler-error"]
        illegal_before = self.stack.tcp.drops["tcp-illegal-input"]
        batch = []
        for op, body in split(data):
            if op == OP_FRAME:
                batch.append(body)
                continue
            if op == OP_FLOOD:
                for _ in range(FLOOD):
                    self.serial += 1
                    batch.append(vary(body, self.serial))
                continue
            if batch:
                self.dispatcher.frames_received(batch)
                batch = []
            self._host_step(op, body)
        if batch:
            self.dispatcher.frames_received(batch)
        self._housekeeping()
        if drops["handler-error"] != errors_before:
            raise AssertionError("a handler raised on guest input:\n"
                                 + (self.failures[-1] if self.failures else "(no traceback)"))
        if self.stack.tcp.drops["tcp-illegal-input"] != illegal_before:
            raise AssertionError("an illegal TCP transition on guest input")
        self._check_caps()

    def _host_step(self, op, body):
        """What the host side does between batches of guest frames."""
        {OP_CONNECT: self._settle_connects, OP_HOST_DATA: self._host_data,
         OP_HOST_CLOSE: self._host_close, OP_CLOCK: self._advance,
         OP_UDP_REPLY: self._udp_reply, OP_ICMP_REPLY: self._icmp_reply,
         OP_DNS: self._dns}[op](body)
        self.stack.tcp.flush()

    def _settle_connects(self, body):
        from twisted.internet import error
        from twisted.python.failure import Failure
        outcomes = body or b"\x00" * len(self.reactor.pending)
        for outcome in outcomes:
            if not self.reactor.pending:
                return
            _deadline, host, port, factory, connector = self.reactor.pending.pop(0)
            if connector.done:
                continue
            connector.done = True
            kind = outcome % 6
            if kind == 0:
                self._connected(factory, host, port)
                continue
            reason = (error.ConnectionRefusedError(), error.TimeoutError(),
                      error.NoRouteError(), error.ConnectError(osError=errno.EHOSTUNREACH),
                      error.ConnectError(osError=errno.EMFILE))[kind - 1]
            factory.clientConnectionFailed(connector, Failure(reason))

    def _connected(self, factory, host, port):
        from twisted.internet.address import IPv4Address
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HostTransport(self)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.host_conns.append(transport)

    def _live_conns(self):
        return [t for t in self.host_conns if not t.disconnecting]

    def _host_data(self, body):
        conns = [t for t in self._live_conns() if not t.paused]
        if conns and body:
            conns[body[0] % len(conns)].protocol.dataReceived(bytes(body[1:]) or b"x")

    def _host_close(self, body):
        from twisted.internet import error
        from twisted.python.failure import Failure
        conns = self._live_conns()
        if not conns or not body:
            return
        transport = conns[body[0] % len(conns)]
        transport.disconnecting = True
        if len(body) > 1 and body[1] & 1:
            transport.protocol.connectionLost(Failure(error.ConnectionLost()))
        else:
            transport.protocol.readConnectionLost()
            transport.protocol.connectionLost(Failure(error.ConnectionDone()))

    def _advance(self, body):
        self.reactor.advance(int.from_bytes(body[:3], "big") / 1000.0)

    def _udp_reply(self, body):
        socks = [s for s in self.udp_sockets if not s.closed]
        if not socks or not body:
            return
        sock = socks[body[0] % len(socks)]
        if body[0] & 0x80 and len(body) >= 3:
            sock.nat.host_icmp_error(sock.flow, body[1], body[2], 0)
        else:
            sock.nat.host_datagram(sock.flow, bytes(body[1:]))

    def _icmp_reply(self, body):
        flows = list(self.icmp_backend.flows.values())
        if not flows or not body:
            return
        flow, request = flows[body[0] % len(flows)]
        nat = self.stack.icmp.forward
        if body[0] & 0x80 and len(body) >= 3:
            nat.host_error(flow, body[1], body[2])
        elif len(request) >= 8:
            reply = bytes((129 if request[0] == 128 else 0,)) + request[1:]  # ICMPv6 or v4
            nat.host_reply(flow, reply, 64)

    def _dns(self, body):
        from twisted.internet import defer
        from twisted.names import dns, error
        pending = self.upstream.pending
        for outcome in body or b"\x00":
            while pending and pending[0][1].called:
                pending.pop(0)
            if not pending:
                return
            q, d = pending.pop(0)
            kind = outcome % 5
            name = q.name.name
            if kind == 0:
                d.callback(([dns.RRHeader(name, dns.A, dns.IN, 60,
                                          dns.Record_A("203.0.113.10", 60))], [], []))
            elif kind == 1:
                d.errback(error.DNSNameError())
            elif kind == 2:
                d.errback(error.DNSServerError())
            elif kind == 3:
                d.callback(([dns.RRHeader(name, dns.A, dns.IN, 30,
                                          dns.Record_A(f"198.51.100.{i}", 30))
                             for i in range(1, 1 + outcome // 5)], [], []))
            else:
                d.errback(defer.TimeoutError())

    def _housekeeping(self):
        """Time passes; connects past their timeout fail as Twisted's would;
        host transports the stack closed report connectionLost."""
        from twisted.internet import error
        from twisted.python.failure import Failure
        self.reactor.advance(TICK)
        now = self.reactor.seconds()
        pending = self.reactor.pending
        while pending and (pending[0][0] <= now or pending[0][4].done):
            _deadline, _h, _p, factory, connector = pending.pop(0)
            if not connector.done:
                connector.done = True
                factory.clientConnectionFailed(connector, Failure(error.TimeoutError()))
        keep = []
        for transport in self.host_conns:
            if transport.disconnecting:
                transport.protocol.connectionLost(Failure(error.ConnectionDone()))
            else:
                keep.append(transport)
        self.host_conns = keep
        self.udp_sockets = [s for s in self.udp_sockets if not s.closed]
        self.upstream.pending = [(q, d) for q, d in self.upstream.pending if not d.called]
        self.stack.tcp.flush()

    def _check_caps(self):
        tcp = self.stack.tcp
        if not 0 <= tcp.half_open <= self.config.max_half_open:
            raise AssertionError(f"{tcp.half_open} half-open TCP connections")
        if len(tcp.connections) > self.config.max_connections:
            raise AssertionError(f"{len(tcp.connections)} TCP connections")
        if len(self.stack.udp.table) > self.config.max_udp_flows:
            raise AssertionError(f"{len(self.stack.udp.table)} UDP flows")


def split(data):
    """(op, body) steps of an input; a step whose length runs past the end
    takes what is left."""
    steps = []
    pos = 0
    end = len(data)
    while pos < end and len(steps) < MAX_STEPS:
        op = data[pos] & 7
        if op == OP_FRAME and data[pos] & 0x80:
            op = OP_FLOOD
        if pos + 3 > end:
            steps.append((op, data[pos + 1:]))
            break
        size = (data[pos + 1] << 8) | data[pos + 2]
        body = data[pos + 3:pos + 3 + size]
        steps.append((op, body))
        pos += 3 + size
    return steps


def vary(frame, serial):
    """``frame`` as the ``serial``-th of a flood: ARP and DHCP from a new MAC
    (chaddr too), TCP and UDP from a new source port (checksums fixed), so
    floods fill the stack's tables as made-up clients and flows would."""
    f = bytearray(frame)
    if len(f) < 34:
        return bytes(f)
    mac = bytes((0x02, 0xF0)) + (serial & 0xFFFFFFFF).to_bytes(4, "big")
    etype = (f[12] << 8) | f[13]
    if etype == 0x0806 and len(f) >= 28:
        f[6:12] = mac
        f[22:28] = mac
        return bytes(f)
    if etype == 0x86DD:
        return _vary6(f, serial, mac)
    if etype != 0x0800:
        return bytes(f)
    l4 = 14 + (f[14] & 0x0F) * 4
    proto = f[23]
    if proto not in (6, 17) or len(f) < l4 + 8:
        return bytes(f)
    if proto == 17 and f[l4 + 2:l4 + 4] == b"\x00\x43":  # to the DHCP server
        f[6:12] = mac
        if len(f) >= l4 + 8 + 34:
            f[l4 + 8 + 28:l4 + 8 + 34] = mac
    else:
        f[l4:l4 + 2] = (1024 + serial % 64000).to_bytes(2, "big")
    total = (f[16] << 8) | f[17]
    end = min(len(f), 14 + total)
    csum = 16 if proto == 6 else 6
    if end >= l4 + csum + 2:
        f[l4 + csum:l4 + csum + 2] = b"\x00\x00"
        if proto == 6:
            pseudo = bytes(f[26:34]) + bytes((0, 6)) + (end - l4).to_bytes(2, "big")
            f[l4 + 16:l4 + 18] = (~_ones(pseudo + bytes(f[l4:end])) & 0xFFFF).to_bytes(2, "big")
    return bytes(f)


def _vary6(f, serial, mac):
    """``vary`` for IPv6: DHCPv6 from a new MAC (its DUID-LL too), TCP and UDP
    from a new source port; the L4 checksum fixed."""
    if len(f) < 62 or f[20] not in (6, 17):
        return bytes(f)
    nh = f[20]
    end = min(len(f), 54 + ((f[18] << 8) | f[19]))
    if nh == 17 and f[56:58] == b"\x02\x23":  # to the DHCPv6 server
        f[6:12] = mac
        if f[22:24] == b"\xfe\x80":  # a link-local source: the new MAC's EUI-64
            f[30:38] = bytes((mac[0] ^ 2, mac[1], mac[2], 0xFF, 0xFE, *mac[3:]))
        if end >= 62 + 18 and f[66:68] == b"\x00\x01":  # client id first: DUID-LL(T)
            f[74:80] = mac
    else:
        f[54:56] = (1024 + serial % 64000).to_bytes(2, "big")
    csum = 54 + (16 if nh == 6 else 6)
    if end < csum + 2:
        return bytes(f)
    f[csum:csum + 2] = b"\x00\x00"
    l4 = bytes(f[54:end])
    pseudo = bytes(f[22:54]) + len(l4).to_bytes(4, "big") + bytes((0, 0, 0, nh))
    value = ~_ones(pseudo + l4) & 0xFFFF
    f[csum:csum + 2] = (value or (0xFFFF if nh == 17 else 0)).to_bytes(2, "big")
    return bytes(f)


def step(op, body=b""):
    return bytes((op,)) + len(body).to_bytes(2, "big") + body


# -- seeds: valid frames built with dpkt (not with the code under test)


def seed_inputs():
    """{name: input} of valid guest traffic, each a short program."""
    import socket

    import dpkt

    def ip4(text):
        return socket.inet_aton(text)

    def eth(data, etype=0x0800, dst=GATEWAY_MAC, src=GUEST_MAC):
        return bytes(dpkt.ethernet.Ethernet(dst=dst, src=src, type=etype, data=data))

    def ipv4(payload, proto, src="10.0.2.2", dst="10.0.2.1"):
        pkt = dpkt.ip.IP(src=ip4(src), dst=ip4(dst), p=proto, ttl=64, data=payload)
        pkt.len = len(pkt)
        return pkt

    def udp(sport, dport, payload, src="10.0.2.2", dst="10.0.2.1", dst_mac=GATEWAY_MAC):
        u = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
        u.ulen = len(u)
        return eth(ipv4(u, 17, src, dst), dst=dst_mac)

    def tcp(sport, dport, seq, ack=0, flags=dpkt.tcp.TH_SYN, payload=b"", opts=b"",
            dst=REMOTE):
        t = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=65535,
                         opts=opts, data=payload)
        t.off = (20 + len(opts)) // 4
        return eth(ipv4(t, 6, dst=dst))

    def dhcp(mtype, xid=0x1234, requested=None):
        opts = [(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([mtype])),
                (dpkt.dhcp.DHCP_OPT_PARAM_REQ, bytes([1, 3, 6, 15, 26, 119]))]
        if requested:
            opts += [(dpkt.dhcp.DHCP_OPT_REQ_IP, ip4(requested)),
                     (dpkt.dhcp.DHCP_OPT_SERVER_ID, ip4("10.0.2.1"))]
        msg = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, chaddr=GUEST_MAC, xid=xid,
                             opts=opts)
        return udp(68, 67, bytes(msg), src="0.0.0.0", dst="255.255.255.255",
                   dst_mac=b"\xff" * 6)

    def dns_query(name, qid=7, qtype=dpkt.dns.DNS_A):
        q = dpkt.dns.DNS(id=qid, op=dpkt.dns.DNS_RD,
                         qd=[dpkt.dns.DNS.Q(name=name, type=qtype, cls=dpkt.dns.DNS_IN)])
        return bytes(q)

    def icmp_echo(dst, ident=9, seq=1):
        e = dpkt.icmp.ICMP(type=8, code=0,
                           data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=b"fuzz" * 8))
        return eth(ipv4(e, 1, dst=dst))

    def ip6(src, dst, nxt, payload, dst_mac, hlim=255):
        packet = dpkt.ip6.IP6(src=src, dst=dst, nxt=nxt, hlim=hlim, data=payload)
        packet.plen = len(bytes(payload))
        return eth(packet, 0x86DD, dst=dst_mac)

    guest_ll = bytes.fromhex("fe80000000000000") + bytes(
        (GUEST_MAC[0] ^ 2, *GUEST_MAC[1:3], 0xFF, 0xFE, *GUEST_MAC[3:]))
    all_routers = bytes.fromhex("ff020000000000000000000000000002")
    gw6 = bytes.fromhex("fd000000000000000000000000000001")
    sol_gw6 = bytes.fromhex("ff0200000000000000000001ff000001")
    dhcp6_servers = bytes.fromhex("ff020000000000000000000000010002")
    rs = dpkt.icmp6.ICMP6(type=133, code=0, data=bytes(4) + b"\x01\x01" + GUEST_MAC)
    ns = dpkt.icmp6.ICMP6(type=135, code=0, data=bytes(4) + gw6 + b"\x01\x01" + GUEST_MAC)
    duid = b"\x00\x03\x00\x01" + GUEST_MAC
    solicit = (b"\x01\x00\x12\x34"                            # SOLICIT, xid
               + struct.pack("!HH", 1, len(duid)) + duid      # client id
               + struct.pack("!HHIII", 3, 12, 1, 0, 0)        # IA_NA, iaid 1
               + struct.pack("!HHH", 8, 2, 0)                 # elapsed time
               + struct.pack("!HHHH", 6, 4, 23, 24))          # ORO: DNS, domain list
    u6 = dpkt.udp.UDP(sport=546, dport=547, data=solicit)
    u6.ulen = len(u6)

    guest6 = bytes.fromhex("fd000000000000000000000000000002")

    def tcp6(sport, dport, seq, ack=0, flags=dpkt.tcp.TH_SYN, opts=b""):
        t = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=65535,
                         opts=opts)
        t.off = (20 + len(opts)) // 4
        return ip6(guest6, gw6, 6, t, GATEWAY_MAC, hlim=64)

    u6_flow = dpkt.udp.UDP(sport=34000, dport=5000, data=b"hello6")
    u6_flow.ulen = len(u6_flow)
    def echo6():  # a new one each time: dpkt keeps the checksum of the first use
        return dpkt.icmp6.ICMP6(type=128, code=0, data=b"\x00\x09\x00\x01" + b"ping6" * 4)

    isn = random.Random(0).getrandbits(32)  # the ISN of the first connection an input opens
    syn_opts = b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07"  # MSS 1460, SACK-permitted, WS 7
    ack = dpkt.tcp.TH_ACK
    syn = tcp(40000, 80, 1000, opts=syn_opts)
    handshake = (step(OP_FRAME, syn) + step(OP_CONNECT, b"\x00")
                 + step(OP_FRAME, tcp(40000, 80, 1001, isn + 1, ack))
                 + step(OP_FRAME, tcp(40000, 80, 1001, isn + 1, ack | dpkt.tcp.TH_PUSH,
                                      b"GET / HTTP/1.0\r\n\r\n"))
                 + step(OP_HOST_DATA, b"\x00" + b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 3000)
                 + step(OP_FRAME, tcp(40000, 80, 1019, isn + 1 + 3019, ack | dpkt.tcp.TH_FIN))
                 + step(OP_HOST_CLOSE, b"\x00\x00")
                 + step(OP_FRAME, tcp(40000, 80, 1020, isn + 1 + 3020, ack)))
    return {
        "arp-request": step(OP_FRAME, eth(dpkt.arp.ARP(
            hrd=1, pro=0x0800, hln=6, pln=4, op=dpkt.arp.ARP_OP_REQUEST, sha=GUEST_MAC,
            spa=ip4("10.0.2.2"), tha=b"\x00" * 6, tpa=ip4("10.0.2.1")), 0x0806,
            dst=b"\xff" * 6)),
        "dhcp-discover-request": (step(OP_FRAME, dhcp(dpkt.dhcp.DHCPDISCOVER))
                                  + step(OP_FRAME, dhcp(dpkt.dhcp.DHCPREQUEST,
                                                        requested="10.0.2.2"))),
        "icmp-echo-gateway": step(OP_FRAME, icmp_echo("10.0.2.1")),
        "icmp-echo-remote": (step(OP_FRAME, icmp_echo(REMOTE))
                             + step(OP_ICMP_REPLY, b"\x00")),
        "dns-query": (step(OP_FRAME, udp(33000, 53, dns_query("fuzz.test")))
                      + step(OP_FRAME, udp(33001, 53, dns_query("example.test", 8)))
                      + step(OP_DNS, b"\x00")),
        "udp-flow": (step(OP_FRAME, udp(34000, 5000, b"hello", dst=REMOTE))
                     + step(OP_UDP_REPLY, b"\x00" + b"world")
                     + step(OP_UDP_REPLY, b"\x80\x03\x03")),
        "tcp-syn": step(OP_FRAME, syn) + step(OP_CONNECT, b"\x01"),
        "tcp-handshake-data-fin": handshake,
        "dns-over-tcp-syn": (step(OP_FRAME, tcp(40001, 53, 500, opts=syn_opts,
                                                dst="10.0.2.1"))
                             + step(OP_CONNECT, b"\x00")),
        "flood-dhcp": step(0x80, dhcp(dpkt.dhcp.DHCPDISCOVER)),
        "flood-syn": step(0x80, syn) + step(OP_CONNECT, b"\x00\x01\x02\x03" * 8),
        "flood-udp": step(0x80, udp(34000, 5000, b"hello", dst=REMOTE)),
        "flood-dns": step(0x80, udp(33000, 53, dns_query("example.test"))),
        "flood-arp": step(0x80, eth(dpkt.arp.ARP(
            hrd=1, pro=0x0800, hln=6, pln=4, op=dpkt.arp.ARP_OP_REQUEST, sha=GUEST_MAC,
            spa=ip4("10.0.2.7"), tha=b"\x00" * 6, tpa=ip4("10.0.2.1")), 0x0806,
            dst=b"\xff" * 6)),
        "clock": step(OP_FRAME, syn) + step(OP_CLOCK, (70_000).to_bytes(3, "big")),
        "ipv6-rs": step(OP_FRAME, ip6(guest_ll, all_routers, 58, rs,
                                      b"\x33\x33\x00\x00\x00\x02")),
        "ipv6-ns-gateway": step(OP_FRAME, ip6(guest_ll, sol_gw6, 58, ns,
                                              b"\x33\x33\xff\x00\x00\x01")),
        "dhcpv6-solicit": step(OP_FRAME, ip6(guest_ll, dhcp6_servers, 17, u6,
                                             b"\x33\x33\x00\x01\x00\x02", hlim=1)),
        "flood-dhcpv6": step(0x80, ip6(guest_ll, dhcp6_servers, 17, u6,
                                       b"\x33\x33\x00\x01\x00\x02", hlim=1)),
        "tcp6-handshake": (step(OP_FRAME, tcp6(40002, 80, 7000, opts=syn_opts))
                           + step(OP_CONNECT, b"\x00")
                           + step(OP_FRAME, tcp6(40002, 80, 7001, isn + 1, ack))
                           + step(OP_HOST_DATA, b"\x00" + b"z" * 2000)),
        "flood-tcp6": step(0x80, tcp6(40003, 80, 9000, opts=syn_opts)) + step(OP_CONNECT),
        "udp6-flow": (step(OP_FRAME, ip6(guest6, gw6, 17, u6_flow, GATEWAY_MAC, hlim=64))
                      + step(OP_UDP_REPLY, b"\x00back6")),
        "flood-udp6": step(0x80, ip6(guest6, gw6, 17, u6_flow, GATEWAY_MAC, hlim=64)),
        "icmpv6-echo-gateway": step(OP_FRAME, ip6(guest6, gw6, 58, echo6(), GATEWAY_MAC,
                                                  hlim=64)),
        "icmpv6-echo-remote": (step(OP_FRAME, ip6(guest6, socket.inet_pton(
            socket.AF_INET6, REMOTE6), 58, echo6(), GATEWAY_MAC, hlim=64))
                               + step(OP_ICMP_REPLY, b"\x00")),
    }


# -- the entry points

_harness = None


def one_input(data):
    """Run one input through the process's one stack (made on first use)."""
    global _harness
    if _harness is None:
        _harness = Harness()
    _harness.run(data)


def write_seeds(directory):
    os.makedirs(directory, exist_ok=True)
    for name, data in seed_inputs().items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    print(f"{len(seed_inputs())} seeds in {directory}")


class _Meter:
    """Counts inputs, takes the RSS baseline after warm-up and enforces the bound."""

    def __init__(self, runs):
        self.runs = runs
        self.count = 0
        self.start_rss = None
        self.baseline = None
        self.baseline_blocks = 0
        self.peak_growth = 0

    def __call__(self, data):
        if self.start_rss is None:
            self.start_rss = rss_bytes()
            print(f"#fuzz RSS at start {self.start_rss / 2**20:.1f} MiB", flush=True)
        one_input(data)
        self.count += 1
        if self.count == WARMUP:
            self.baseline = rss_bytes()
            self.baseline_blocks = sys.getallocatedblocks()
            print(f"#fuzz RSS after {WARMUP} inputs (baseline) {self.baseline / 2**20:.1f} MiB, "
                  f"{self.baseline_blocks} Python blocks", flush=True)
        elif self.count % CHECK_EVERY == 0 or self.count == self.runs:
            self.report()

    def report(self):
        rss = rss_bytes()
        h = _harness
        line = (f"#fuzz {self.count} inputs: RSS {rss / 2**20:.1f} MiB; frames in "
                f"{h.dispatcher.frames_in}, out {h.link.frames_out}; tcp {len(h.stack.tcp.connections)}"
                f", udp {len(h.stack.udp.table)}, leases {len(h.stack.dhcp.core._leases)}"
                f", neighbours {len(h.dispatcher.neighbours.macs)}")
        if self.baseline is not None:
            growth = rss - self.baseline
            self.peak_growth = max(self.peak_growth, growth)
            # Python's allocated blocks: the stack's own objects, apart from
            # what libFuzzer (its corpus, native) adds to RSS.
            blocks = sys.getallocatedblocks() - self.baseline_blocks
            line += (f"; growth since baseline {growth / 2**20:+.1f} MiB, {blocks:+d} Python "
                     f"blocks (bound {RSS_BOUND / 2**20:.0f} MiB)")
            print(line, flush=True)
            if growth > RSS_BOUND:
                print(f"#fuzz FAIL: RSS grew {growth / 2**20:.1f} MiB after warm-up", flush=True)
                os._exit(3)
        else:
            print(line, flush=True)
        if self.count == self.runs:
            drops = sorted(h.dispatcher.stats()["drops"].items(), key=lambda kv: -kv[1])
            print(f"#fuzz done: {self.count} inputs; peak growth after warm-up "
                  f"{self.peak_growth / 2**20:+.1f} MiB; top drops {drops[:12]}", flush=True)


def main(argv):
    if "--write-seeds" in argv:
        write_seeds(argv[argv.index("--write-seeds") + 1])
        return
    import atheris
    from twisted.logger import globalLogBeginner

    # No log file: lines go nowhere (the harness watches for failures itself),
    # and Twisted's start-up buffer of 64k events is not kept.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False,
                                     discardBuffer=True)
    with atheris.instrument_imports(include=["arcbox_net", "dpkt"]):
        import dpkt  # noqa: F401  (ARP and DHCP parse with it)
        import arcbox_net.dispatch  # noqa: F401
        import arcbox_net.framer  # noqa: F401
        import arcbox_net.stack  # noqa: F401
        import arcbox_net.protocols.dns  # noqa: F401
        import arcbox_net.protocols.icmp_nat  # noqa: F401
        import arcbox_net.protocols.udp_nat  # noqa: F401
        import arcbox_net.tcp.nat  # noqa: F401
        import arcbox_net.forward  # noqa: F401
        for name in ("ndp", "dhcpv6"):
            try:
                __import__(f"arcbox_net.protocols.{name}")
            except ImportError:
                pass
    runs = 0
    for arg in argv:
        if arg.startswith("-atheris_runs="):
            runs = int(arg.split("=", 1)[1])
    atheris.Setup(argv, _Meter(runs))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
