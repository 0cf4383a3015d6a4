"""UDP NAT: each guest flow gets its own connected host UDP socket.

Theory of operation
-------------------
A flow is (guest address, guest port, remote address, remote port), the
remote address being the one the guest used. Its first datagram looks up
``Egress.local_services`` and then ``Egress.route`` (gateway -> host
loopback, ``--map``, ``--allow``/``--deny``); a denied destination gets ICMP
destination unreachable code 13 (administratively prohibited), one with no
route code 0 (net unreachable). Otherwise a host UDP socket is bound to an
ephemeral port (on 127.0.0.1 for loopback targets, else on all addresses)
and connected to the host address, so the kernel only delivers that peer's
replies to it. Replies reach the guest from the address and port the guest
used. Replies larger than the link MTU are fragmented, as a router would.

The flow table (``FlowTable``) is sans-I/O: it takes ``now`` values and
answers which flows expired, which one to evict and when the next deadline
is. A flow idles out after ``config.udp_timeout`` seconds, or after
``config.udp_established_timeout`` once traffic went both ways (as
conntrack does). Beyond ``config.max_udp_flows`` the flow idle for longest
is evicted (``drops["udp-flow-evicted"]``). One reactor timer, set to the
next deadline, drives expiry; datagrams never touch it (activity only moves
deadlines later, so an early wakeup just rescans and re-arms).

ICMP errors the host receives for a flow become the matching ICMP error to
the guest, quoting the guest's last datagram (IP header + 8 bytes) with the
remote address the guest used as source, so ``nc -u`` or a DNS client in
the guest fails fast. The host socket has IP_RECVERR set, and the error
queue (MSG_ERRQUEUE) gives the ICMP type and code, so port, host, net and
protocol unreachable and time exceeded are all passed on.

Why not ``reactor.listenUDP``: Twisted's ``udp.Port`` is torn down by the
epoll and poll reactors when an ICMP error arrives on a connected socket (the
kernel reports EPOLLERR without EPOLLIN, which the reactor takes for a
closed descriptor: ``connectionRefused`` is never called and the port is
gone), and any errno other than ECONNREFUSED escapes its ``doRead``. So the
host side is ``HostUdpSocket``, a minimal IReadDescriptor that provides
IHalfCloseableDescriptor: the reactor's "read side lost" on EPOLLERR lands
in ``readConnectionLost``, which drains the error queue and resumes reading.
It also reads many datagrams per wakeup and logs nothing per flow.
"""

import errno
import ipaddress
import socket
import struct
from collections import Counter, OrderedDict

from twisted.internet.interfaces import IHalfCloseableDescriptor, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IIPv4Handler
from ..wire import MalformedFrame, icmp, ipv4, udp
from ..wire.checksum import checksum

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
#: struct sock_extended_err: errno, origin, type, code, pad, info, data.
_EXT_ERR = struct.Struct("=IBBBBII")
_FRAG_HEADER = struct.Struct("!BBHHHBBH4s4s")
_MF = 0x2000
_ICMP_FOR_ERRNO = {
    errno.ECONNREFUSED: icmp.CODE_PORT_UNREACH,
    errno.EHOSTUNREACH: icmp.CODE_HOST_UNREACH,
    errno.ENETUNREACH: icmp.CODE_NET_UNREACH,
    errno.EACCES: icmp.CODE_ADMIN_PROHIBITED,
    errno.EPERM: icmp.CODE_ADMIN_PROHIBITED,
}


def ip_str(raw):
    return socket.inet_ntoa(raw)


# -- the sans-I/O flow table


class Flow:
    """What the table needs of a flow; protocols add their own fields."""

    __slots__ = ("key", "created", "last_active", "established",
                 "bytes_out", "bytes_in", "packets_out", "packets_in")

    def __init__(self, key):
        self.key = key
        self.created = self.last_active = 0.0
        self.established = False
        self.bytes_out = self.bytes_in = 0
        self.packets_out = self.packets_in = 0


class FlowTable:
    """Flows by key, in order of last activity; idle expiry and a size cap.

    ``timeout`` applies until a flow has seen traffic both ways,
    ``established_timeout`` after (never shorter than ``timeout``).
    """

    def __init__(self, timeout, established_timeout=None, max_flows=1024):
        self.timeout = timeout
        self.established_timeout = max(timeout, established_timeout or timeout)
        self.max_flows = max_flows
        self._flows = OrderedDict()   # least recently active first

    def __len__(self):
        return len(self._flows)

    def __iter__(self):
        return iter(list(self._flows.values()))

    def get(self, key):
        return self._flows.get(key)

    def add(self, flow, now):
        """Insert ``flow``; return the flows evicted to stay within the cap."""
        evicted = []
        while self._flows and len(self._flows) >= self.max_flows:
            evicted.append(self._flows.popitem(last=False)[1])
        flow.created = flow.last_active = now
        self._flows[flow.key] = flow
        return evicted

    def remove(self, flow):
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]

    def outbound(self, flow, nbytes, now):
        """Guest -> host traffic."""
        flow.bytes_out += nbytes
        flow.packets_out += 1
        self._touch(flow, now)

    def inbound(self, flow, nbytes, now):
        """Host -> guest traffic: the flow now counts as established."""
        flow.bytes_in += nbytes
        flow.packets_in += 1
        flow.established = True
        self._touch(flow, now)

    def _touch(self, flow, now):
        flow.last_active = now
        if self._flows.get(flow.key) is flow:
            self._flows.move_to_end(flow.key)

    def deadline(self, flow):
        return flow.last_active + (self.established_timeout if flow.established
                                   else self.timeout)

    def expire(self, now):
        """Remove and return the flows whose idle timeout has passed."""
        expired = []
        for flow in self._flows.values():
            if flow.last_active + self.timeout > now:
                break      # this and every later flow were active too recently
            if now >= self.deadline(flow):
                expired.append(flow)
        for flow in expired:
            del self._flows[flow.key]
        return expired

    def next_deadline(self):
        """The earliest expiry time, or None when the table is empty."""
        best = None
        for flow in self._flows.values():
            if best is not None and flow.last_active + self.timeout >= best:
                break
            deadline = self.deadline(flow)
            if best is None or deadline < best:
                best = deadline
        return best


class ExpiryTimer:
    """One reactor timer at a table's next deadline; calls ``on_expired(flows)``."""

    def __init__(self, reactor, table, on_expired):
        self.reactor = reactor
        self.table = table
        self.on_expired = on_expired
        self._call = None

    def schedule(self):
        deadline = self.table.next_deadline()
        call = self._call
        if deadline is None:
            self.cancel()
            return
        if call is not None and call.active():
            if call.getTime() <= deadline:
                return   # fires no later than needed; it rescans then
            call.cancel()
        self._call = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()),
                                            self._fire)

    def _fire(self):
        self._call = None
        expired = self.table.expire(self.reactor.seconds())
        if expired:
            self.on_expired(expired)
        self.schedule()

    def cancel(self):
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


# -- error queue reading, shared with the ICMP NAT's ping sockets


def read_error_queue(sock, limit=32):
    """Drain ``sock``'s IP_RECVERR queue: a list of (errno, origin, type, code, info)."""
    out = []
    for _ in range(limit):
        try:
            _data, ancdata, _flags, _addr = sock.recvmsg(512, 512, MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_IP and ctype == IP_RECVERR and len(cdata) >= _EXT_ERR.size:
                ee_errno, origin, etype, ecode, _pad, info, _d = _EXT_ERR.unpack_from(cdata)
                out.append((ee_errno, origin, etype, ecode, info))
    return out


@implementer(IReadDescriptor, IHalfCloseableDescriptor)
class ErrorQueueReader:
    """A non-blocking socket in the reactor, with IP_RECVERR handled.

    Subclasses implement ``_read_one()`` (one recv; raise BlockingIOError when
    empty) and ``_errors(list)``, ``_errno(code)``. An EPOLLERR wakeup without
    data reaches ``readConnectionLost`` (the reactor has then stopped reading
    us): drain the error queue and start reading again.
    """

    read_budget = 64

    def __init__(self, reactor, sock):
        self.reactor = reactor
        self.sock = sock
        reactor.addReader(self)

    def fileno(self):
        sock = self.sock
        return sock.fileno() if sock is not None else -1

    def logPrefix(self):
        return type(self).__name__

    def doRead(self):
        got = False
        for _ in range(self.read_budget):
            if self.sock is None:
                return None
            try:
                self._read_one()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._pending_error(e.errno)
            got = True
        if not got and self.sock is not None:
            self._drain()      # a wakeup for a queued error only (select reactor)
        return None

    def readConnectionLost(self, reason):
        if self.sock is None:
            return
        self._drain()
        self.doRead()
        if self.sock is not None:
            self.reactor.addReader(self)

    def connectionLost(self, reason):
        self.close()

    def _drain(self):
        errors = read_error_queue(self.sock)
        if errors:
            self._errors(errors)
        return bool(errors)

    def _pending_error(self, code):
        """recv/send returned a pending socket error: find out what it was."""
        if not self._drain():
            self._errno(code)

    def close(self):
        sock, self.sock = self.sock, None
        if sock is not None:
            self.reactor.removeReader(self)
            sock.close()


class HostUdpSocket(ErrorQueueReader):
    """The host side of one flow: a connected UDP socket with IP_RECVERR."""

    def __init__(self, nat, flow):
        host, port = flow.target
        bind = "127.0.0.1" if ipaddress.IPv4Address(host).is_loopback else "0.0.0.0"
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            sock.bind((bind, 0))
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
        self.nat = nat
        self.flow = flow
        super().__init__(nat.reactor, sock)

    @property
    def address(self):
        return self.sock.getsockname() if self.sock is not None else None

    def send(self, data):
        for _attempt in range(2):
            if self.sock is None:
                return
            try:
                self.sock.send(data)
                return
            except (BlockingIOError, InterruptedError):
                self.nat.drops["udp-host-buffer-full"] += 1
                return
            except OSError as e:
                if e.errno == errno.EMSGSIZE:
                    self.nat.drops["udp-host-too-big"] += 1
                    return
                if self._drain():
                    continue    # an error left by an earlier ICMP message: reported; retry
                self._errno(e.errno)   # synchronous: no route, prohibited, ...
                return

    def _read_one(self):
        data = self.sock.recv(65535)
        self.nat.host_datagram(self.flow, data)

    def _errors(self, errors):
        for ee_errno, origin, etype, ecode, info in errors:
            if origin == SO_EE_ORIGIN_ICMP:
                self.nat.host_icmp_error(self.flow, etype, ecode, info)
            else:
                self._errno(ee_errno)

    def _errno(self, code):
        icmp_code = _ICMP_FOR_ERRNO.get(code)
        if icmp_code is None:
            self.nat.drops["udp-host-error"] += 1
        else:
            self.nat.host_icmp_error(self.flow, icmp.TYPE_DEST_UNREACH, icmp_code, 0)


# -- the handler


class UdpFlow(Flow):
    __slots__ = ("guest_ip", "guest_port", "remote_ip", "remote_port", "target",
                 "quote", "socket")

    def __init__(self, key, target):
        super().__init__(key)
        self.guest_ip, self.guest_port, self.remote_ip, self.remote_port = key
        self.target = target
        self.quote = b""
        self.socket = None


@implementer(IIPv4Handler)
class UdpNat:
    """The IPv4 handler for UDP the stack does not serve itself."""

    log = Logger()
    ip_protocol = ipv4.PROTO_UDP

    def __init__(self, dispatcher, config, egress, reactor, socket_factory=HostUdpSocket):
        self.dispatcher = dispatcher
        self.config = config
        self.egress = egress
        self.reactor = reactor
        self.socket_factory = socket_factory
        self.table = FlowTable(config.udp_timeout, config.udp_established_timeout,
                               config.max_udp_flows)
        self.timer = ExpiryTimer(reactor, self.table, self._expired)
        self.drops = Counter()
        self.counters = Counter()
        #: (guest ip, guest port, source ip, source port) -> callable(payload):
        #: flows of UDP port forwards, whose guest replies go to a host client.
        self.inbound = {}

    # -- lifecycle

    def stop(self):
        self.timer.cancel()
        for flow in self.table:
            self.table.remove(flow)
            self._close(flow)

    # -- guest side

    def handle_ipv4(self, frame, ip):
        sport, dport, start, end = udp.parse(frame, ip)
        key = (bytes(ip.src), sport, bytes(ip.dst), dport)
        if self.inbound:
            reply_to = self.inbound.get(key)
            if reply_to is not None:
                # The guest answering a client of a UDP port forward.
                reply_to(bytes(frame[start:end]))
                return
        now = self.reactor.seconds()
        flow = self.table.get(key)
        quote = bytes(frame[ip.payload_offset - ip.header_len:ip.payload_offset + 8])
        if flow is None:
            flow = self._open(key, quote)
            if flow is None:
                return
        flow.quote = quote
        payload = bytes(frame[start:end])
        self.table.outbound(flow, len(payload), now)
        flow.socket.send(payload)

    def _open(self, key, quote):
        guest_ip, guest_port, remote_ip, remote_port = key
        if remote_port == 0 or guest_port == 0:
            raise MalformedFrame("udp-port-zero")
        target = self.egress.local_services.get((remote_ip, remote_port))
        if target is None:
            verdict, host = self.egress.route(remote_ip)
            if verdict == "denied":
                self.drops["udp-denied"] += 1
                self._icmp_to_guest(remote_ip, guest_ip, quote, icmp.CODE_ADMIN_PROHIBITED)
                return None
            if verdict == "no-route":
                self.drops["udp-no-route"] += 1
                self._icmp_to_guest(remote_ip, guest_ip, quote, icmp.CODE_NET_UNREACH)
                return None
            target = (host, remote_port)
        flow = UdpFlow(key, (str(target[0]), int(target[1])))
        try:
            flow.socket = self.socket_factory(self, flow)
        except OSError as e:
            code = _ICMP_FOR_ERRNO.get(e.errno)
            if code is None or code == icmp.CODE_PORT_UNREACH:
                self.drops["udp-socket-failed"] += 1
                self.log.warn("UDP NAT: no host socket for {target}: {error}",
                              target=flow.target, error=e)
            else:
                self.drops["udp-host-unreachable"] += 1
                self._icmp_to_guest(remote_ip, guest_ip, quote, code)
            return None
        for old in self.table.add(flow, self.reactor.seconds()):
            self.drops["udp-flow-evicted"] += 1
            self._close(old)
        self.counters["udp-flows-opened"] += 1
        self.timer.schedule()
        return flow

    # -- host side (called by the flow's socket)

    def host_datagram(self, flow, data):
        if self.table.get(flow.key) is not flow:
            return
        self.table.inbound(flow, len(data), self.reactor.seconds())
        self.send_to_guest(flow, data)

    def host_icmp_error(self, flow, icmp_type, code, info=0):
        """The host got an ICMP error for ``flow``: tell the guest as a router would."""
        if not flow.quote:
            return
        if icmp_type == icmp.TYPE_DEST_UNREACH:
            if code == icmp.CODE_FRAG_NEEDED:
                # The host kernel fragments on its side; nothing for the guest to do.
                self.counters["udp-host-frag-needed"] += 1
                return
            message = icmp.dest_unreachable(code, flow.quote)
        elif icmp_type == icmp.TYPE_TIME_EXCEEDED:
            message = icmp.build(icmp.TYPE_TIME_EXCEEDED, code, b"\0\0\0\0", flow.quote)
        else:
            self.drops["udp-host-icmp-ignored"] += 1
            return
        self.counters["udp-icmp-to-guest"] += 1
        self.dispatcher.send_ipv4(flow.remote_ip, flow.guest_ip, ipv4.PROTO_ICMP, message)

    # -- the way out

    def _icmp_to_guest(self, src, dst, quote, code):
        self.dispatcher.send_ipv4(src, dst, ipv4.PROTO_ICMP, icmp.dest_unreachable(code, quote))

    def send_to_guest(self, flow, data):
        """Send ``data`` from flow.remote_ip:remote_port to flow.guest_ip:guest_port."""
        src, dst = flow.remote_ip, flow.guest_ip
        if ipv4.HEADER_LEN + udp.HEADER_LEN + len(data) <= self.config.mtu:
            self.dispatcher.send_udp(src, dst, flow.remote_port, flow.guest_port, data)
            return
        self.counters["udp-fragmented"] += 1
        datagram = udp.build(src, dst, flow.remote_port, flow.guest_port, data)
        for fragment in fragment_ipv4(src, dst, ipv4.PROTO_UDP, datagram, self.config.mtu,
                                      self.dispatcher.next_ident()):
            self.dispatcher.send_frame([self.dispatcher.ethernet_header(), *fragment])

    def _expired(self, flows):
        for flow in flows:
            self.counters["udp-flows-expired"] += 1
            self._close(flow)

    def _close(self, flow):
        sock, flow.socket = flow.socket, None
        if sock is not None:
            sock.close()

    # -- introspection

    def flows(self):
        now = self.reactor.seconds()
        out = []
        for flow in self.table:
            address = getattr(flow.socket, "address", None)
            out.append({
                "protocol": "udp", "direction": "outbound",
                "guest": f"{ip_str(flow.guest_ip)}:{flow.guest_port}",
                "remote": f"{ip_str(flow.remote_ip)}:{flow.remote_port}",
                "host": f"{flow.target[0]}:{flow.target[1]}",
                "local": f"{address[0]}:{address[1]}" if address else None,
                "state": "established" if flow.established else "unreplied",
                "bytes_from_guest": flow.bytes_out, "bytes_to_guest": flow.bytes_in,
                "age": round(now - flow.created, 3), "idle": round(now - flow.last_active, 3),
            })
        return out


def fragment_ipv4(src, dst, protocol, payload, mtu, ident, ttl=64):
    """Split an L4 payload into IPv4 fragments of at most ``mtu`` bytes.

    Returns a list of (header, chunk) pairs.
    """
    step = (mtu - ipv4.HEADER_LEN) & ~7
    out = []
    view = memoryview(payload)
    for offset in range(0, len(payload), step):
        chunk = view[offset:offset + step]
        more = offset + step < len(payload)
        raw = _FRAG_HEADER.pack(0x45, 0, ipv4.HEADER_LEN + len(chunk), ident & 0xFFFF,
                                (offset >> 3) | (_MF if more else 0), ttl, protocol, 0, src, dst)
        csum = checksum(raw)
        out.append((raw[:10] + csum.to_bytes(2, "big") + raw[12:], bytes(chunk)))
    return out
