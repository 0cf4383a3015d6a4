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
import random
import socket
from collections import Counter

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from ..fdbudget import MIN_IDLE, FdBudget
from ..interfaces import IIPv4Handler, IIPv6Handler
from ..policy import Refusal
from ..ratelimit import LimitedLog
from ..wire import MalformedFrame, icmp, ip as ipfamily, ipv4, udp
from .hostflows import (SO_EE_ORIGIN_ICMP, ErrorQueueReader, ExpiryTimer, Flow, FlowTable,
                        open_error_queue_socket)

_ICMP_FOR_ERRNO = {
    errno.ECONNREFUSED: icmp.CODE_PORT_UNREACH,
    errno.EHOSTUNREACH: icmp.CODE_HOST_UNREACH,
    errno.ENETUNREACH: icmp.CODE_NET_UNREACH,
    errno.EACCES: icmp.CODE_ADMIN_PROHIBITED,
    errno.EPERM: icmp.CODE_ADMIN_PROHIBITED,
}

#: Lines a guest (or a local peer) can cause over and over, rate-limited.
_limited_log = LimitedLog(Logger(namespace=__name__))


class HostUdpSocket(ErrorQueueReader):
    """The host side of one flow: a connected UDP socket with IP_RECVERR."""

    def __init__(self, nat, flow):
        host, port = flow.target
        loopback = ipaddress.ip_address(host).is_loopback
        if ":" in host:
            bind = "::1" if loopback else "::"
        else:
            bind = "127.0.0.1" if loopback else "0.0.0.0"
        sock = open_error_queue_socket(host)
        try:
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


@implementer(IIPv4Handler, IIPv6Handler)
class UdpNat:
    """The handler of both IP families for UDP the stack does not serve itself."""

    log = Logger()
    ip_protocol = ipv4.PROTO_UDP

    def __init__(self, dispatcher, config, egress, reactor, socket_factory=HostUdpSocket,
                 fd_budget=None):
        self.framer = dispatcher.framer
        #: Host sockets the guest may still make us hold (fdbudget.py).
        self.fd_budget = fd_budget if fd_budget is not None else FdBudget()
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
        quote = ipfamily.quote(frame, ip)
        if flow is None:
            flow = self._open(key, quote)
            if flow is None:
                return
        flow.quote = quote
        payload = bytes(frame[start:end])
        self.table.outbound(flow, len(payload), now)
        flow.socket.send(payload)

    handle_ipv6 = handle_ipv4

    def _open(self, key, quote):
        guest_ip, guest_port, remote_ip, remote_port = key
        if remote_port == 0 or guest_port == 0:
            raise MalformedFrame("udp-port-zero")
        target = self.egress.route(remote_ip, remote_port)
        if isinstance(target, Refusal):
            self.drops["udp-" + target.reason] += 1
            self._icmp_to_guest(remote_ip, guest_ip, quote, target.icmp_code)
            return None
        self._make_room()
        flow = UdpFlow(key, (str(target[0]), int(target[1])))
        try:
            flow.socket = self.socket_factory(self, flow)
        except OSError as e:
            code = _ICMP_FOR_ERRNO.get(e.errno)
            if code is None or code == icmp.CODE_PORT_UNREACH:
                self.drops["udp-socket-failed"] += 1
                _limited_log.warn("UDP NAT: no host socket for {target}: {error}",
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

    def _make_room(self):
        """Descriptors running short: close flows idle for a quarter of their
        timeout, and at the budget's end the least recently active one."""
        budget = self.fd_budget
        if not budget.under_pressure():
            return
        now = self.reactor.seconds()
        idle = max(MIN_IDLE, self.config.udp_timeout / 4)
        for flow in self.table.expire_idle(now, idle):
            self.drops["udp-fd-reaped"] += 1
            self._close(flow)
        while budget.room() <= 0 and len(self.table):
            flow = self.table.pop_oldest()
            self.drops["udp-fd-evicted"] += 1
            self._close(flow)

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
        if icmp_type == icmp.TYPE_DEST_UNREACH and code == icmp.CODE_FRAG_NEEDED:
            # The host kernel fragments on its side; nothing for the guest to do.
            self.counters["udp-host-frag-needed"] += 1
            return
        if icmp_type not in (icmp.TYPE_DEST_UNREACH, icmp.TYPE_TIME_EXCEEDED):
            self.drops["udp-host-icmp-ignored"] += 1
            return
        self.counters["udp-icmp-to-guest"] += 1
        self.framer.send_icmp_error(flow.remote_ip, flow.guest_ip, icmp_type, code, flow.quote)

    # -- the way out

    def _icmp_to_guest(self, src, dst, quote, code):
        self.framer.send_icmp_error(src, dst, icmp.TYPE_DEST_UNREACH, code, quote)

    def send_to_guest(self, flow, data):
        """Send ``data`` from flow.remote_ip:remote_port to flow.guest_ip:guest_port
        (the framer fragments it when it is larger than the link's MTU)."""
        self.framer.send_udp(flow.remote_ip, flow.guest_ip, flow.remote_port, flow.guest_port,
                             data)

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
                "guest": ipfamily.endpoint_str(flow.guest_ip, flow.guest_port),
                "remote": ipfamily.endpoint_str(flow.remote_ip, flow.remote_port),
                "host": _host_str(*flow.target),
                "local": _host_str(*address[:2]) if address else None,
                "state": "established" if flow.established else "unreplied",
                "bytes_from_guest": flow.bytes_out, "bytes_to_guest": flow.bytes_in,
                "age": round(now - flow.created, 3), "idle": round(now - flow.last_active, 3),
            })
        return out


def _host_str(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _UdpForwardFlow:
    """One host client of a UDP forward, as the UDP NAT's sender expects it."""

    __slots__ = ("key", "created", "last_active", "established", "bytes_out", "bytes_in",
                 "packets_out", "packets_in", "client", "port", "guest_ip", "guest_port",
                 "remote_ip", "remote_port")

    def __init__(self, key, client, port):
        self.key = key
        self.client = client
        self.port = port
        self.guest_ip, self.guest_port, self.remote_ip, self.remote_port = key
        self.created = self.last_active = 0.0
        self.established = False
        self.bytes_out = self.bytes_in = self.packets_out = self.packets_in = 0


class _UdpForwardProtocol(DatagramProtocol):
    noisy = False

    def __init__(self, forwarder, forward):
        self.forwarder = forwarder
        self.forward = forward

    def datagramReceived(self, data, addr):
        self.forwarder.from_client(self, data, addr)


class UdpForwarder:
    """UDP forwards: each host client gets its own source port toward the guest.

    The guest's replies come back through the UDP NAT, which hands datagrams
    for these flows here (``UdpNat.inbound``); they leave from the forward's
    listening socket to the client. Flows idle out like UDP NAT flows.
    """

    def __init__(self, stack):
        self.stack = stack
        self.nat = stack.udp
        config = stack.config
        self.table = FlowTable(config.udp_timeout, config.udp_established_timeout,
                               config.max_udp_flows)
        self.timer = ExpiryTimer(stack.reactor, self.table, self._expired)
        self._by_client = {}

    def listen(self, forward):
        spec = forward.spec
        return self.stack.reactor.listenUDP(spec.host_port, _UdpForwardProtocol(self, forward),
                                            interface=str(spec.bind))

    def from_client(self, protocol, data, client):
        forward = protocol.forward
        now = self.stack.reactor.seconds()
        ident = (forward.id, client)
        flow = self._by_client.get(ident)
        if flow is None or self.table.get(flow.key) is not flow:
            flow = self._open(forward, protocol, client, now)
            if flow is None:
                return
        self.table.outbound(flow, len(data), now)
        self.nat.send_to_guest(flow, data)

    def _open(self, forward, protocol, client, now):
        from twisted.internet.address import IPv4Address as TwistedAddress
        guest = forward.guest_address()
        guest_ip = guest.packed
        src_ip, preferred = forward.source_for(TwistedAddress("UDP", *client[:2]), guest)
        key = None
        for port in ([preferred] if preferred else []) + [None] * 64:
            port = port or random.randint(32768, 60999)
            candidate = (guest_ip, forward.guest_port, src_ip, port)
            if candidate not in self.nat.inbound and self.nat.table.get(candidate) is None:
                key = candidate
                break
        if key is None:
            self.nat.drops["udp-forward-no-port"] += 1
            return None
        flow = _UdpForwardFlow(key, client, protocol)
        for old in self.table.add(flow, now):
            self.nat.drops["udp-flow-evicted"] += 1
            self._forget(old)
        self._by_client[(forward.id, client)] = flow
        self.nat.inbound[key] = lambda data, flow=flow: self._to_client(flow, data)
        self.nat.counters["udp-forward-flows"] += 1
        self.timer.schedule()
        return flow

    def _to_client(self, flow, data):
        if self.table.get(flow.key) is not flow:
            return
        self.table.inbound(flow, len(data), self.stack.reactor.seconds())
        transport = flow.port.transport
        if transport is not None:
            try:
                transport.write(data, flow.client)
            except OSError:
                self.nat.drops["udp-forward-send-failed"] += 1

    def _expired(self, flows):
        for flow in flows:
            self._forget(flow)

    def _forget(self, flow):
        self.nat.inbound.pop(flow.key, None)
        for ident, other in list(self._by_client.items()):
            if other is flow:
                del self._by_client[ident]

    def stop(self):
        self.timer.cancel()
        for flow in self.table:
            self.table.remove(flow)
            self._forget(flow)

    def flows(self):
        now = self.stack.reactor.seconds()
        out = []
        for flow in self.table:
            gip, gport, sip, sport = flow.key
            out.append({
                "protocol": "udp", "direction": "inbound",
                "guest": ipfamily.endpoint_str(gip, gport),
                "remote": ipfamily.endpoint_str(sip, sport),
                "host": _host_str(*flow.client[:2]),
                "state": "established" if flow.established else "unreplied",
                "bytes_to_guest": flow.bytes_out, "bytes_from_guest": flow.bytes_in,
                "age": round(now - flow.created, 3),
            })
        return out
