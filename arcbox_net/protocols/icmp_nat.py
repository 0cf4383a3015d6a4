"""ICMP echo NAT: guest pings to other hosts, sent from real host sockets.

``IcmpHandler`` answers echo to the stack's own addresses and hands every
other ICMP message to ``IcmpNat.handle_ipv4`` (its ``forward``). Echo
requests go through the same ``Egress`` mapping and policy as TCP and UDP: a
denied target gets ICMP administratively prohibited, one without a route
net unreachable, and never an echo reply: the guest only ever sees a reply
that a host really sent.

Two ways out, chosen once at start:

- unprivileged ping sockets (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``),
  one per echo flow (guest address, guest identifier, remote address),
  connected to the host address. The kernel gives each its own identifier
  and delivers it only the matching replies; IP_RECVTTL gives the reply's
  TTL and IP_RECVERR the ICMP errors. Linux allows them only for groups in
  ``net.ipv4.ping_group_range``;
- otherwise, when we may (root or CAP_NET_RAW), one raw ICMP socket
  filtered (ICMP_FILTER) to echo replies and errors; each flow gets a free
  identifier of ours, and replies are matched on (identifier, source).

Either way the reply the guest gets carries its own identifier again, the
sequence number and payload as received, the TTL as received and, as
source, the address the guest pinged. Echo flows idle out after
``timeout`` seconds (30 by default), driven by one timer.
"""

import errno
import ipaddress
import os
import random
import socket
import struct
from collections import Counter

from twisted.logger import Logger

from ..wire import icmp, ipv4
from ..wire.checksum import ones_sum
from ..policy import Refusal
from ..ratelimit import LimitedLog
from .hostflows import (IP_RECVERR, SO_EE_ORIGIN_ICMP, ErrorQueueReader, ExpiryTimer, Flow,
                        FlowTable, ip_str)

#: Lines a guest can cause over and over, rate-limited.
_limited_log = LimitedLog(Logger(namespace=__name__))
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
SOL_RAW = getattr(socket, "SOL_RAW", 255)
ICMP_FILTER = 1
_ECHO = struct.Struct("!HH")
_ERRNO_CODES = {
    errno.EHOSTUNREACH: icmp.CODE_HOST_UNREACH,
    errno.ENETUNREACH: icmp.CODE_NET_UNREACH,
    errno.EACCES: icmp.CODE_ADMIN_PROHIBITED,
    errno.EPERM: icmp.CODE_ADMIN_PROHIBITED,
}
PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"


# -- sans-I/O: identifier rewriting and parsing what a raw socket reads


def with_ident(message, ident):
    """An echo request/reply with identifier ``ident``; sequence and payload kept."""
    seq = (message[6] << 8) | message[7]
    return icmp.build(message[0], message[1], _ECHO.pack(ident & 0xFFFF, seq),
                      bytes(message[8:]))


def echo_fields(message):
    """(type, code, identifier, sequence) of an ICMP echo message."""
    return message[0], message[1], (message[4] << 8) | message[5], (message[6] << 8) | message[7]


def parse_raw_packet(packet):
    """Classify an IPv4 packet read from a raw ICMP socket.

    Returns ("reply", src, ident, ttl, icmp_message) for an echo reply,
    ("error", type, code, inner_dst, ident) for a destination-unreachable or
    time-exceeded message quoting one of our echo requests, or None.
    """
    if len(packet) < 28 or packet[0] >> 4 != 4:
        return None
    hlen = (packet[0] & 0x0F) * 4
    total = min(len(packet), (packet[2] << 8) | packet[3]) or len(packet)
    message = packet[hlen:total]
    if len(message) < 8 or packet[9] != ipv4.PROTO_ICMP:
        return None
    mtype, code = message[0], message[1]
    if mtype == icmp.TYPE_ECHO_REPLY:
        if ones_sum(message) != 0xFFFF:
            return None
        return ("reply", bytes(packet[12:16]), (message[4] << 8) | message[5], packet[8],
                bytes(message))
    if mtype in (icmp.TYPE_DEST_UNREACH, icmp.TYPE_TIME_EXCEEDED):
        inner = message[8:]
        if len(inner) < 28 or inner[0] >> 4 != 4 or inner[9] != ipv4.PROTO_ICMP:
            return None
        ihlen = (inner[0] & 0x0F) * 4
        quoted = inner[ihlen:ihlen + 8]
        if len(quoted) < 8 or quoted[0] != icmp.TYPE_ECHO_REQUEST:
            return None
        return ("error", mtype, code, bytes(inner[16:20]), (quoted[4] << 8) | quoted[5])
    return None


def _ttl_from(ancdata):
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_IP and ctype == socket.IP_TTL and len(cdata) >= 4:
            return struct.unpack("=i", cdata[:4])[0]
    return 64


def ping_group_range():
    try:
        with open(PING_GROUP_RANGE) as f:
            return " ".join(f.read().split())
    except OSError:
        return "unknown"


# -- host sockets


class PingSocket(ErrorQueueReader):
    """One echo flow's unprivileged ping socket, connected to ``host``.

    ``on_reply(icmp_message, ttl)`` gets each echo reply (the kernel's
    identifier in it); ``on_error(type, code)`` each ICMP error.
    """

    def __init__(self, reactor, host, on_reply, on_error):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_IP, IP_RECVTTL, 1)
            sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            sock.connect((host, 0))
        except OSError:
            sock.close()
            raise
        self.on_reply = on_reply
        self.on_error = on_error
        super().__init__(reactor, sock)

    @property
    def ident(self):
        return self.sock.getsockname()[1] if self.sock is not None else None

    def send(self, message):
        """Send an echo request (the kernel sets the identifier and checksum)."""
        for _attempt in range(2):
            if self.sock is None:
                return
            try:
                self.sock.send(message)
                return
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if self._drain():
                    continue    # an error left by an earlier ICMP message: reported; retry
                self._errno(e.errno)   # synchronous: no route, prohibited, ...
                return

    def _read_one(self):
        data, ancdata, _flags, _addr = self.sock.recvmsg(65535, 64)
        self.on_reply(data, _ttl_from(ancdata))

    def _errors(self, errors):
        for ee_errno, origin, etype, ecode, _info in errors:
            if origin == SO_EE_ORIGIN_ICMP:
                self.on_error(etype, ecode)
            else:
                self._errno(ee_errno)

    def _errno(self, code):
        icmp_code = _ERRNO_CODES.get(code)
        if icmp_code is not None:
            self.on_error(icmp.TYPE_DEST_UNREACH, icmp_code)


class RawIcmpSocket(ErrorQueueReader):
    """The one raw ICMP socket, filtered to echo replies and errors."""

    def __init__(self, reactor, on_packet):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            sock.setblocking(False)
            passed = ((1 << icmp.TYPE_ECHO_REPLY) | (1 << icmp.TYPE_DEST_UNREACH)
                      | (1 << icmp.TYPE_TIME_EXCEEDED))
            try:
                sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~passed & 0xFFFFFFFF))
            except OSError:
                pass   # only an optimisation: parse_raw_packet ignores the rest
        except OSError:
            sock.close()
            raise
        self.on_packet = on_packet
        super().__init__(reactor, sock)

    def sendto(self, message, host):
        self.sock.sendto(message, (host, 0))

    def _read_one(self):
        self.on_packet(self.sock.recv(65535))

    def _errors(self, errors):
        pass

    def _errno(self, code):
        pass


# -- the two ways out


class PingBackend:
    name = "ping"

    def __init__(self, nat, socket_factory=PingSocket):
        self.nat = nat
        self.socket_factory = socket_factory

    def open(self, flow):
        nat = self.nat
        flow.socket = self.socket_factory(
            nat.reactor, flow.host,
            lambda message, ttl: nat.host_reply(flow, message, ttl),
            lambda mtype, code: nat.host_error(flow, mtype, code))
        flow.host_id = flow.socket.ident

    def send(self, flow, message):
        if flow.socket is not None:
            flow.socket.send(message)

    def close(self, flow):
        sock, flow.socket = flow.socket, None
        if sock is not None:
            sock.close()

    def stop(self):
        pass


class RawBackend:
    name = "raw"

    def __init__(self, nat, sock=None):
        self.nat = nat
        self.sock = sock if sock is not None else RawIcmpSocket(nat.reactor, self.packet_received)
        self.by_ident = {}

    def open(self, flow):
        if len(self.by_ident) >= 65535:
            raise OSError(errno.EADDRNOTAVAIL, "no free ICMP identifier")
        ident = random.randrange(1, 65536)
        while ident in self.by_ident:
            ident = ident % 65535 + 1
        flow.host_id = ident
        self.by_ident[ident] = flow

    def send(self, flow, message):
        try:
            self.sock.sendto(with_ident(message, flow.host_id), flow.host)
        except (BlockingIOError, InterruptedError):
            self.nat.drops["icmp-host-buffer-full"] += 1
        except OSError as e:
            code = _ERRNO_CODES.get(e.errno)
            if code is None:
                self.nat.drops["icmp-host-send-failed"] += 1
            else:
                self.nat.host_error(flow, icmp.TYPE_DEST_UNREACH, code)

    def close(self, flow):
        if self.by_ident.get(flow.host_id) is flow:
            del self.by_ident[flow.host_id]

    def stop(self):
        self.sock.close()

    def packet_received(self, packet):
        parsed = parse_raw_packet(packet)
        if parsed is None:
            return
        if parsed[0] == "reply":
            _kind, src, ident, ttl, message = parsed
            flow = self.by_ident.get(ident)
            if flow is not None and flow.host_packed == src:
                self.nat.host_reply(flow, message, ttl)
        else:
            _kind, mtype, code, inner_dst, ident = parsed
            flow = self.by_ident.get(ident)
            if flow is not None and flow.host_packed == inner_dst:
                self.nat.host_error(flow, mtype, code)


# -- the handler


class EchoFlow(Flow):
    __slots__ = ("guest_ip", "guest_id", "remote_ip", "host", "host_packed", "host_id",
                 "quote", "socket")

    def __init__(self, key, host):
        super().__init__(key)
        self.guest_ip, self.guest_id, self.remote_ip = key
        self.host = host
        self.host_packed = ipaddress.IPv4Address(host).packed
        self.host_id = None
        self.quote = b""
        self.socket = None


class IcmpNat:
    """ICMP to other hosts (``IcmpHandler.forward``): echo NAT, nothing else.

    Not a dispatch handler itself: ``IcmpHandler`` owns IP protocol 1 and
    calls ``handle_ipv4``, ``start`` and ``stop`` here.
    """

    log = Logger()

    def __init__(self, dispatcher, config, egress, reactor, mode="auto", timeout=30.0,
                 max_flows=1024):
        self.framer = dispatcher.framer
        self.config = config
        self.egress = egress
        self.reactor = reactor
        #: "auto" (ping sockets, else raw), "ping", "raw", or a backend object.
        self.mode = mode
        self.backend = None
        self.table = FlowTable(timeout, timeout, max_flows)
        self.timer = ExpiryTimer(reactor, self.table, self._expired)
        self.drops = Counter()
        self.counters = Counter()

    # -- lifecycle

    def start(self):
        if self.backend is None:
            self.backend = self._choose_backend()

    def stop(self):
        self.timer.cancel()
        backend, self.backend = self.backend, None
        for flow in self.table:
            self.table.remove(flow)
            if backend is not None:
                backend.close(flow)
        if backend is not None:
            backend.stop()

    def _choose_backend(self):
        mode = self.mode
        if not isinstance(mode, str):
            return mode
        ping_error = None
        if mode in ("auto", "ping"):
            try:
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
            except OSError as e:
                ping_error = e
            else:
                self.log.info("ICMP echo NAT: using unprivileged ping sockets")
                return PingBackend(self)
        why = (f"ping sockets are not allowed for gid {os.getgid()} "
               f"(net.ipv4.ping_group_range = \"{ping_group_range()}\": {ping_error.strerror})"
               if ping_error is not None else "raw ICMP socket requested")
        if mode == "ping":
            self.log.error("ICMP echo NAT disabled: {why}; pings to other hosts are dropped",
                           why=why)
            return None
        try:
            backend = RawBackend(self)
        except OSError as e:
            self.log.error("ICMP echo NAT disabled: {why}, and a raw ICMP socket failed too "
                           "({error}; it needs root or CAP_NET_RAW); pings to other hosts "
                           "are dropped", why=why, error=e.strerror)
            return None
        self.log.warn("ICMP echo NAT: {why}; using a raw ICMP socket instead", why=why)
        return backend

    # -- guest side

    def handle_ipv4(self, frame, ip):
        message = ip.payload(frame)
        if len(message) < 8:
            self.drops["icmp-nat-short"] += 1
            return
        if message[0] != icmp.TYPE_ECHO_REQUEST or message[1] != 0:
            self.drops["icmp-nat-not-echo-request"] += 1
            return
        if ones_sum(message) != 0xFFFF:
            self.drops["icmp-nat-bad-checksum"] += 1
            return
        src, dst = bytes(ip.src), bytes(ip.dst)
        quote = ipv4.quote(frame, ip)
        target = self.egress.route(dst)
        if isinstance(target, Refusal):
            self.drops["icmp-" + target.reason] += 1
            self.framer.send_icmp_error(dst, src, icmp.TYPE_DEST_UNREACH, target.icmp_code, quote)
            return
        host = target[0]
        backend = self.backend
        if backend is None:
            self.drops["icmp-nat-unavailable"] += 1
            return
        key = (src, (message[4] << 8) | message[5], dst)
        flow = self.table.get(key)
        if flow is None:
            flow = EchoFlow(key, host)
            try:
                backend.open(flow)
            except OSError as e:
                self.drops["icmp-socket-failed"] += 1
                _limited_log.warn("ICMP echo NAT: no host socket for {host}: {error}",
                                  host=flow.host, error=e)
                return
            for old in self.table.add(flow, self.reactor.seconds()):
                self.drops["icmp-flow-evicted"] += 1
                backend.close(old)
            self.counters["icmp-flows-opened"] += 1
            self.timer.schedule()
        flow.quote = quote
        self.table.outbound(flow, len(message), self.reactor.seconds())
        self.counters["icmp-echo-requests"] += 1
        backend.send(flow, bytes(message))

    # -- host side

    def host_reply(self, flow, message, ttl):
        if self.table.get(flow.key) is not flow or len(message) < 8 \
                or message[0] != icmp.TYPE_ECHO_REPLY:
            return
        self.table.inbound(flow, len(message), self.reactor.seconds())
        self.counters["icmp-echo-replies"] += 1
        self.framer.send_ip(flow.remote_ip, flow.guest_ip, ipv4.PROTO_ICMP,
                            with_ident(message, flow.guest_id), ttl=ttl)

    def host_error(self, flow, mtype, code):
        if self.table.get(flow.key) is not flow or not flow.quote:
            return
        if mtype not in (icmp.TYPE_DEST_UNREACH, icmp.TYPE_TIME_EXCEEDED):
            return
        self.counters["icmp-errors-to-guest"] += 1
        self.framer.send_icmp_error(flow.remote_ip, flow.guest_ip, mtype, code, flow.quote)

    def _expired(self, flows):
        for flow in flows:
            self.counters["icmp-flows-expired"] += 1
            if self.backend is not None:
                self.backend.close(flow)

    # -- introspection

    def flows(self):
        now = self.reactor.seconds()
        return [{
            "protocol": "icmp", "direction": "outbound",
            "guest": f"{ip_str(flow.guest_ip)} id {flow.guest_id}",
            "remote": ip_str(flow.remote_ip),
            "host": f"{flow.host} id {flow.host_id}",
            "state": "answered" if flow.established else "waiting",
            "bytes_from_guest": flow.bytes_out, "bytes_to_guest": flow.bytes_in,
            "age": round(now - flow.created, 3), "idle": round(now - flow.last_active, 3),
        } for flow in self.table]
