"""Host-socket flows the UDP and ICMP NAT share.

``Flow`` and ``FlowTable`` are sans-I/O: the table takes ``now`` values and
answers which flows expired, which to evict at the cap and when the next
deadline is; ``ExpiryTimer`` is the one reactor timer that drives it.
``ErrorQueueReader`` is a host socket in the reactor with IP_RECVERR: the
ICMP errors the host kernel receives for a flow come from its error queue
(``read_error_queue``), never as a torn-down descriptor. An IPv6 socket's
ICMPv6 errors are reported in ICMPv4 terms (``_ICMP_FROM_ICMP6``): the NATs
speak one language and the framer turns it back into ICMPv6 for an IPv6
guest, so a v4 guest behind a v6-only host path still hears the failure.
"""

import socket
import struct
from collections import OrderedDict

from twisted.internet.interfaces import IHalfCloseableDescriptor, IReadDescriptor
from zope.interface import implementer

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
#: ICMPv6 (type, code) -> the ICMPv4 (type, code) of the same failure.
_ICMP_FROM_ICMP6 = {
    (1, 0): (3, 0), (1, 1): (3, 13), (1, 2): (3, 1), (1, 3): (3, 1), (1, 4): (3, 3),
    (1, 5): (3, 13), (1, 6): (3, 13), (2, 0): (3, 4), (3, 0): (11, 0), (3, 1): (11, 1),
}
#: struct sock_extended_err: errno, origin, type, code, pad, info, data.
_EXT_ERR = struct.Struct("=IBBBBII")


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

    def expire_idle(self, now, idle):
        """Remove and return the flows idle for ``idle`` seconds or more,
        established or not (descriptors running short)."""
        expired = []
        for flow in self._flows.values():
            if now - flow.last_active < idle:
                break
            expired.append(flow)
        for flow in expired:
            del self._flows[flow.key]
        return expired

    def pop_oldest(self):
        """Remove and return the least recently active flow."""
        return self._flows.popitem(last=False)[1]

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
            if len(cdata) < _EXT_ERR.size or (level, ctype) not in _RECVERR_CMSGS:
                continue
            ee_errno, origin, etype, ecode, _pad, info, _d = _EXT_ERR.unpack_from(cdata)
            if origin == SO_EE_ORIGIN_ICMP6:
                translated = _ICMP_FROM_ICMP6.get((etype, ecode))
                if translated is None:
                    continue
                origin = SO_EE_ORIGIN_ICMP
                etype, ecode = translated
            out.append((ee_errno, origin, etype, ecode, info))
    return out


_RECVERR_CMSGS = {(socket.SOL_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)}


def open_error_queue_socket(host, kind=socket.SOCK_DGRAM, proto=0):
    """A non-blocking socket of ``host``'s family with its error queue on
    (IP_RECVERR or IPV6_RECVERR)."""
    v6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind, proto)
    try:
        sock.setblocking(False)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
    except OSError:
        sock.close()
        raise
    return sock


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


def ip_str(raw):
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)
