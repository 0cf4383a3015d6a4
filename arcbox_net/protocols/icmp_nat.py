"""ICMP echo NAT: guest pings to other hosts, sent from real host sockets.

``IcmpHandler`` (and ``Icmpv6Handler`` for IPv6) answers echo to the stack's
own addresses and hands every other echo request to ``IcmpNat``, one object
for both families (``handle_ipv4`` is also ``handle_ipv6``). Echo requests
go through the same ``Egress`` mapping and policy as TCP and UDP: a denied
target gets ICMP administratively prohibited, one without a route net
unreachable (ICMPv6 ones to an IPv6 guest: the framer translates), and never
an echo reply: the guest only ever sees a reply that a host really sent.

Two ways out per host address family, chosen once at start:

- unprivileged ping sockets (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``,
  ``AF_INET6``/``IPPROTO_ICMPV6`` for IPv6), one per echo flow (guest
  address, guest identifier, remote address), connected to the host
  address. The kernel gives each its own identifier and delivers it only the
  matching replies; IP_RECVTTL/IPV6_RECVHOPLIMIT give the reply's TTL and
  IP_RECVERR/IPV6_RECVERR the ICMP errors (``hostflows`` reports ICMPv6 ones
  in ICMPv4 terms). Linux allows them only for groups in
  ``net.ipv4.ping_group_range``, which governs both families;
- otherwise, when we may (root or CAP_NET_RAW), one raw ICMP (ICMPv6) socket
  filtered to echo replies and errors; each flow gets a free identifier of
  ours, and replies are matched on (identifier, source).

Should ``Egress`` lead to a host address of the other family (--map
refuses to mix them; a host without ``::1`` makes the IPv6 gateway's host
127.0.0.1, but the stack answers echo to the gateway itself), the echo is
re-typed, its identifier, sequence and payload kept. Either way the reply the guest gets carries its
own identifier again, the sequence number and payload as received, the TTL
(hop limit) as received and, as source, the address the guest pinged. Echo
flows idle out after ``timeout`` seconds (30 by default), driven by one timer.
"""

import errno
import ipaddress
import os
import random
import socket
import struct
from collections import Counter

from twisted.logger import Logger

from ..wire import icmp, icmpv6, ip as ipfamily, ipv4, ipv6
from ..wire.checksum import ones_sum
from ..policy import Refusal
from ..ratelimit import LimitedLog
from .hostflows import (_ICMP_FROM_ICMP6, SO_EE_ORIGIN_ICMP, ErrorQueueReader, ExpiryTimer,
                        Flow, FlowTable, ip_str, open_error_queue_socket)

#: Lines a guest can cause over and over, rate-limited.
_limited_log = LimitedLog(Logger(namespace=__name__))
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)
IPPROTO_ICMPV6 = getattr(socket, "IPPROTO_ICMPV6", 58)
SOL_RAW = getattr(socket, "SOL_RAW", 255)
ICMP_FILTER = 1
ICMP6_FILTER = 1
_ECHO = struct.Struct("!HH")
_ERRNO_CODES = {
    errno.EHOSTUNREACH: icmp.CODE_HOST_UNREACH,
    errno.ENETUNREACH: icmp.CODE_NET_UNREACH,
    errno.EACCES: icmp.CODE_ADMIN_PROHIBITED,
    errno.EPERM: icmp.CODE_ADMIN_PROHIBITED,
}
_FRAG_NEEDED = (icmp.TYPE_DEST_UNREACH, icmp.CODE_FRAG_NEEDED)
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


def host_request(message, v6, ident=None):
    """A guest's echo request (of either family) as the host family's: ICMP
    type 8 with its checksum, or ICMPv6 type 128 with the checksum left to
    the kernel (it sums ICMPv6 over the pseudo-header on every socket kind).
    ``ident`` replaces the identifier; sequence and payload are kept."""
    if ident is None:
        ident = (message[4] << 8) | message[5]
    rest = _ECHO.pack(ident & 0xFFFF, (message[6] << 8) | message[7])
    if v6:
        return bytes((icmpv6.TYPE_ECHO_REQUEST, 0, 0, 0)) + rest + bytes(message[8:])
    return icmp.build(icmp.TYPE_ECHO_REQUEST, 0, rest, bytes(message[8:]))


def guest_reply(message, ident, src, dst):
    """The echo reply for the guest (``dst``, 4 or 16 bytes) from ``src``,
    from a host's reply of either family: identifier ``ident``, the host's
    sequence and payload."""
    rest = _ECHO.pack(ident & 0xFFFF, (message[6] << 8) | message[7])
    if len(dst) == 16:
        return icmpv6.build(src, dst, icmpv6.TYPE_ECHO_REPLY, 0, rest, bytes(message[8:]))
    return icmp.build(icmp.TYPE_ECHO_REPLY, 0, rest, bytes(message[8:]))


def parse_raw_packet(packet):
    """Classify an IPv4 packet read from a raw ICMP socket.

    Returns ("reply", src, ident, ttl, icmp_message) for an echo reply,
    ("error", type, code, inner_dst, ident, mtu) for a destination-unreachable
    or time-exceeded message quoting one of our echo requests, or None.
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
        mtu = (message[6] << 8) | message[7] if (mtype, code) == _FRAG_NEEDED else 0
        return ("error", mtype, code, bytes(inner[16:20]), (quoted[4] << 8) | quoted[5], mtu)
    return None


def parse_raw6_message(message, src, hop_limit):
    """Classify an ICMPv6 message read from a raw ICMPv6 socket (which gives
    the message alone; ``src`` is the sender's 16 bytes). The same tuples as
    ``parse_raw_packet``, errors in ICMPv4 terms (packet too big is
    fragmentation needed, with its MTU)."""
    if len(message) < 8:
        return None
    mtype, code = message[0], message[1]
    if mtype == icmpv6.TYPE_ECHO_REPLY:
        return ("reply", bytes(src), (message[4] << 8) | message[5], hop_limit, bytes(message))
    if mtype not in (icmpv6.TYPE_DEST_UNREACH, icmpv6.TYPE_PACKET_TOO_BIG,
                     icmpv6.TYPE_TIME_EXCEEDED):
        return None
    translated = _ICMP_FROM_ICMP6.get((mtype, code))
    inner = message[8:]
    # Our own requests carry no extension headers: ICMPv6 right after 40 bytes.
    if translated is None or len(inner) < 48 or inner[0] >> 4 != 6 \
            or inner[6] != icmpv6.NH_ICMPV6 or inner[40] != icmpv6.TYPE_ECHO_REQUEST:
        return None
    mtu = struct.unpack_from("!I", message, 4)[0] if mtype == icmpv6.TYPE_PACKET_TOO_BIG else 0
    return ("error", translated[0], translated[1], bytes(inner[24:40]),
            (inner[44] << 8) | inner[45], mtu)


def _ttl_from(ancdata):
    for level, ctype, cdata in ancdata:
        if len(cdata) >= 4 and ((level, ctype) == (socket.SOL_IP, socket.IP_TTL)
                                or (level, ctype) == (socket.IPPROTO_IPV6, IPV6_HOPLIMIT)):
            return struct.unpack("=i", cdata[:4])[0]
    return 64


def ping_group_range():
    try:
        with open(PING_GROUP_RANGE) as f:
            return " ".join(f.read().split())
    except OSError:
        return "unknown"


def _family(v6):
    return "IPv6" if v6 else "IPv4"


# -- host sockets


class PingSocket(ErrorQueueReader):
    """One echo flow's unprivileged ping socket, connected to ``host`` (of
    either family).

    ``on_reply(icmp_message, ttl)`` gets each echo reply (the kernel's
    identifier in it); ``on_error(type, code, mtu)`` each ICMP error, in
    ICMPv4 terms for both families.
    """

    def __init__(self, reactor, host, on_reply, on_error):
        v6 = ":" in host
        sock = open_error_queue_socket(host, socket.SOCK_DGRAM,
                                       IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        try:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_RECVTTL, 1)
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
        for ee_errno, origin, etype, ecode, info in errors:
            if origin == SO_EE_ORIGIN_ICMP:
                self.on_error(etype, ecode, info if (etype, ecode) == _FRAG_NEEDED else 0)
            else:
                self._errno(ee_errno)

    def _errno(self, code):
        icmp_code = _ERRNO_CODES.get(code)
        if icmp_code is not None:
            self.on_error(icmp.TYPE_DEST_UNREACH, icmp_code, 0)


class RawIcmpSocket(ErrorQueueReader):
    """The one raw ICMP socket, filtered to echo replies and errors;
    ``on_packet(ipv4_packet)``."""

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


def icmp6_filter(passed):
    """struct icmp6_filter passing only the types in ``passed`` (a set bit blocks)."""
    words = [0xFFFFFFFF] * 8
    for kind in passed:
        words[kind >> 5] &= ~(1 << (kind & 31))
    return struct.pack("=8I", *words)


class RawIcmp6Socket(ErrorQueueReader):
    """The one raw ICMPv6 socket, filtered (ICMP6_FILTER) to echo replies and
    errors; ``on_packet(message, src, hop_limit)``: a raw ICMPv6 socket reads
    the message without the IPv6 header."""

    def __init__(self, reactor, on_packet):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_ICMPV6)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
            try:
                sock.setsockopt(IPPROTO_ICMPV6, ICMP6_FILTER, icmp6_filter(
                    (icmpv6.TYPE_ECHO_REPLY, icmpv6.TYPE_DEST_UNREACH,
                     icmpv6.TYPE_PACKET_TOO_BIG, icmpv6.TYPE_TIME_EXCEEDED)))
            except OSError:
                pass   # only an optimisation: parse_raw6_message ignores the rest
        except OSError:
            sock.close()
            raise
        self.on_packet = on_packet
        super().__init__(reactor, sock)

    def sendto(self, message, host):
        self.sock.sendto(message, (host, 0))

    def _read_one(self):
        data, ancdata, _flags, addr = self.sock.recvmsg(65535, 64)
        try:
            src = ipaddress.IPv6Address(addr[0].partition("%")[0]).packed
        except ValueError:
            return
        self.on_packet(data, src, _ttl_from(ancdata))

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
            lambda mtype, code, mtu=0: nat.host_error(flow, mtype, code, mtu))
        flow.host_id = flow.socket.ident

    def send(self, flow, message):
        if flow.socket is not None:
            flow.socket.send(host_request(message, flow.host_v6))

    def close(self, flow):
        sock, flow.socket = flow.socket, None
        if sock is not None:
            sock.close()

    def stop(self):
        pass


class RawBackend:
    """One raw socket of one family (``v6``) and the identifiers it gave out."""

    name = "raw"

    def __init__(self, nat, sock=None, v6=False):
        self.nat = nat
        self.v6 = v6
        if sock is None:
            sock = (RawIcmp6Socket(nat.reactor, self.message6_received) if v6
                    else RawIcmpSocket(nat.reactor, self.packet_received))
        self.sock = sock
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
            self.sock.sendto(host_request(message, flow.host_v6, flow.host_id), flow.host)
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
        self._parsed(parse_raw_packet(packet))

    def message6_received(self, message, src, hop_limit):
        self._parsed(parse_raw6_message(message, src, hop_limit))

    def _parsed(self, parsed):
        if parsed is None:
            return
        if parsed[0] == "reply":
            _kind, src, ident, ttl, message = parsed
            flow = self.by_ident.get(ident)
            if flow is not None and flow.host_packed == src:
                self.nat.host_reply(flow, message, ttl)
        else:
            _kind, mtype, code, inner_dst, ident, mtu = parsed
            flow = self.by_ident.get(ident)
            if flow is not None and flow.host_packed == inner_dst:
                self.nat.host_error(flow, mtype, code, mtu)


# -- the handler


class EchoFlow(Flow):
    __slots__ = ("guest_ip", "guest_id", "remote_ip", "host", "host_packed", "host_v6",
                 "host_id", "quote", "socket")

    def __init__(self, key, host):
        super().__init__(key)
        self.guest_ip, self.guest_id, self.remote_ip = key
        self.host = host
        self.host_packed = ipaddress.ip_address(host).packed
        self.host_v6 = len(self.host_packed) == 16
        self.host_id = None
        self.quote = b""
        self.socket = None


class IcmpNat:
    """ICMP echo to other hosts, for both families: ``IcmpHandler.forward``
    and ``Icmpv6Handler.forward``. Not a dispatch handler itself: those own
    IP protocol 1 and ICMPv6 and call ``handle_ipv4``/``handle_ipv6`` here;
    ``IcmpHandler`` calls ``start`` and ``stop``.
    """

    log = Logger()

    def __init__(self, dispatcher, config, egress, reactor, mode="auto", timeout=30.0,
                 max_flows=1024):
        self.framer = dispatcher.framer
        self.config = config
        self.egress = egress
        self.reactor = reactor
        #: "auto" (ping sockets, else raw), "ping", "raw", or a backend object
        #: (then serving both families).
        self.mode = mode
        #: The way out to IPv4 host addresses, and to IPv6 ones.
        self.backend = None
        self.backend6 = None
        self.table = FlowTable(timeout, timeout, max_flows)
        self.timer = ExpiryTimer(reactor, self.table, self._expired)
        self.drops = Counter()
        self.counters = Counter()

    # -- lifecycle

    def start(self):
        if self.backend is None:
            self.backend = self._choose_backend(v6=False)
        if self.backend6 is None and self._wants_ipv6():
            self.backend6 = self._choose_backend(v6=True)

    def _wants_ipv6(self):
        """IPv6 host sockets are needed for an IPv6 guest or a v6 --map target."""
        return self.config.ipv6 or any(host.version == 6 for _v, host in self.config.address_map)

    def stop(self):
        self.timer.cancel()
        backends = [b for b in dict.fromkeys((self.backend, self.backend6)) if b is not None]
        self.backend = self.backend6 = None
        for flow in self.table:
            self.table.remove(flow)
            for backend in backends:
                backend.close(flow)
        for backend in backends:
            backend.stop()

    def _choose_backend(self, v6):
        mode = self.mode
        if not isinstance(mode, str):
            return mode
        family = socket.AF_INET6 if v6 else socket.AF_INET
        ping_error = None
        if mode in ("auto", "ping"):
            try:
                socket.socket(family, socket.SOCK_DGRAM,
                              IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP).close()
            except OSError as e:
                ping_error = e
            else:
                self.log.info("ICMP{v} echo NAT: using unprivileged ping sockets",
                              v="v6" if v6 else "")
                return PingBackend(self)
            if ping_error.errno == errno.EAFNOSUPPORT:
                # A host booted without IPv6: no socket of the family at all.
                self.log.warn("ICMP{v} echo NAT: the host has no {family} ({error}); pings "
                              "to {family} hosts are dropped", v="v6" if v6 else "",
                              family=_family(v6), error=ping_error.strerror)
                return None
        if v6:
            # One line says why for both families (the sysctl governs both).
            why = (f"no IPv6 ping sockets ({ping_error.strerror})" if ping_error is not None
                   else "raw ICMPv6 socket requested")
        else:
            why = (f"ping sockets are not allowed for gid {os.getgid()} "
                   f"(net.ipv4.ping_group_range = \"{ping_group_range()}\": "
                   f"{ping_error.strerror})" if ping_error is not None
                   else "raw ICMP socket requested")
        name = "ICMPv6" if v6 else "ICMP"
        if mode == "ping":
            self.log.error("{name} echo NAT disabled: {why}; pings to other {family} hosts "
                           "are dropped", name=name, why=why, family=_family(v6))
            return None
        try:
            backend = RawBackend(self, v6=v6)
        except OSError as e:
            self.log.error("{name} echo NAT disabled: {why}, and a raw {name} socket failed "
                           "too ({error}; it needs root or CAP_NET_RAW); pings to other "
                           "{family} hosts are dropped", name=name, why=why, error=e.strerror,
                           family=_family(v6))
            return None
        self.log.warn("{name} echo NAT: {why}; using a raw {name} socket instead", name=name,
                      why=why)
        return backend

    # -- guest side

    def handle_ipv4(self, frame, ip):
        """An echo request from the guest (IPv4 or IPv6) to a host not the stack."""
        message = ip.payload(frame)
        src, dst = bytes(ip.src), bytes(ip.dst)
        v6 = len(src) == 16
        if len(message) < 8:
            self.drops["icmp-nat-short"] += 1
            return
        if message[0] != (icmpv6.TYPE_ECHO_REQUEST if v6 else icmp.TYPE_ECHO_REQUEST) \
                or message[1] != 0:
            self.drops["icmp-nat-not-echo-request"] += 1
            return
        if not (icmpv6.verify(src, dst, message) if v6 else ones_sum(message) == 0xFFFF):
            self.drops["icmp-nat-bad-checksum"] += 1
            return
        quote = ipfamily.quote(frame, ip)
        target = self.egress.route(dst)
        if isinstance(target, Refusal):
            self.drops["icmp-" + target.reason] += 1
            self.framer.send_icmp_error(dst, src, icmp.TYPE_DEST_UNREACH, target.icmp_code, quote)
            return
        host = target[0]
        backend = self.backend6 if ":" in host else self.backend
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
                code = _ERRNO_CODES.get(e.errno)
                if code is not None:
                    # The connect of a ping socket found no route (or was
                    # refused): the guest hears it at once, as from a router.
                    self.drops["icmp-host-unreachable"] += 1
                    self.framer.send_icmp_error(dst, src, icmp.TYPE_DEST_UNREACH, code, quote)
                    return
                self.drops["icmp-socket-failed"] += 1
                _limited_log.warn("ICMP echo NAT: no host socket for {host}: {error}",
                                  host=flow.host, error=e)
                return
            for old in self.table.add(flow, self.reactor.seconds()):
                self.drops["icmp-flow-evicted"] += 1
                self._backend_of(old).close(old)
            self.counters["icmp-flows-opened"] += 1
            self.timer.schedule()
        flow.quote = quote
        self.table.outbound(flow, len(message), self.reactor.seconds())
        self.counters["icmp-echo-requests"] += 1
        backend.send(flow, bytes(message))

    handle_ipv6 = handle_ipv4

    def _backend_of(self, flow):
        return self.backend6 if flow.host_v6 else self.backend

    # -- host side

    def host_reply(self, flow, message, ttl):
        if self.table.get(flow.key) is not flow or len(message) < 8 or message[0] != (
                icmpv6.TYPE_ECHO_REPLY if flow.host_v6 else icmp.TYPE_ECHO_REPLY):
            return
        self.table.inbound(flow, len(message), self.reactor.seconds())
        self.counters["icmp-echo-replies"] += 1
        protocol = icmpv6.NH_ICMPV6 if len(flow.guest_ip) == 16 else ipv4.PROTO_ICMP
        self.framer.send_ip(flow.remote_ip, flow.guest_ip, protocol,
                            guest_reply(message, flow.guest_id, flow.remote_ip, flow.guest_ip),
                            ttl=ttl)

    def host_error(self, flow, mtype, code, mtu=0):
        """An ICMP error (ICMPv4 terms, whatever the host family) about ``flow``."""
        if self.table.get(flow.key) is not flow or not flow.quote:
            return
        if mtype not in (icmp.TYPE_DEST_UNREACH, icmp.TYPE_TIME_EXCEEDED):
            return
        if len(flow.guest_ip) == 16 and (mtype, code) == _FRAG_NEEDED:
            mtu = max(mtu, ipv6.MIN_MTU)   # no IPv6 link carries less
        self.counters["icmp-errors-to-guest"] += 1
        self.framer.send_icmp_error(flow.remote_ip, flow.guest_ip, mtype, code, flow.quote, mtu)

    def _expired(self, flows):
        for flow in flows:
            self.counters["icmp-flows-expired"] += 1
            backend = self._backend_of(flow)
            if backend is not None:
                backend.close(flow)

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
