"""DHCP server core (sans-I/O): payload in, reply out, time from ``clock()``.

The guest configures itself by DHCP, so this server is the one authority on
its network: it NAKs any request it would not grant instead of staying
silent, which makes a guest that remembers a stale address start over at
once. State is a map MAC -> Lease plus its reverse, address -> MAC. Offers
are held briefly so that two guests booting together get distinct
addresses; expired leases are reclaimed lazily on every call, from a heap
of expiry times. A MAC that had an address gets it back while nobody else
holds it (guests reboot); those memories are bounded (``REMEMBERED``).
A REQUEST is granted only for an address the stack offered or leased to
that MAC (or its static lease): an INIT-REBOOT from a MAC the server never
saw gets a NAK, so made-up MACs cannot bind the pool. Every request costs
O(1): new addresses come from a free list (never-used addresses in order,
then returned ones), not a scan of the pool.
Without relays every reply goes out on the one link, addressed per RFC 2131
4.1, so the caller only wraps it in UDP/IPv4/Ethernet. Input is untrusted:
anything unexpected is counted in ``drops`` and answered with None.
"""

import heapq
import ipaddress
import struct
from collections import Counter, deque

import attrs
import dpkt
from zope.interface import implementer

from ..interfaces import IUDPService

from ..wire import dnsname
from ..wire.ethernet import BROADCAST, is_unicast
from .leasing import expired, undeclined

_D = dpkt.dhcp
OFFER_HOLD = 30.0      # seconds an unanswered offer keeps its address
DECLINE_HOLD = 600.0   # seconds a declined address stays out of the pool
MIN_BOOTP_LEN = 300    # RFC 1542 2.1: some clients drop shorter replies
ZERO_IP = b"\x00" * 4
#: MACs whose last address is remembered (to give it back), at most.
REMEMBERED = 4096


@attrs.frozen
class Lease:
    mac: bytes
    address: ipaddress.IPv4Address
    expiry: float       # clock() time; for an offer, when the offer lapses
    state: str          # "offered" | "bound"
    hostname: str | None


@attrs.frozen
class DhcpReply:
    payload: bytes      # UDP payload, from port 67 to port 68
    dst_ip: bytes
    dst_mac: bytes
    message_type: int


#: RFC 1035 3.1 wire form without compression, as RFC 3397 allows (option 119).
encode_name = dnsname.encode


def _split(code: int, value: bytes) -> list:
    """RFC 3396: an option longer than 255 bytes becomes consecutive parts."""
    return [(code, value[i:i + 255]) for i in range(0, len(value), 255)] or [(code, b"")]


class DhcpServer:
    """The allocation policy and message handling; see the module docstring."""

    #: Callables(lease): a lease was bound (on_bind before on_lease, which
    #: the stack's events use) / a bound lease ended (released, declined,
    #: expired).
    on_lease = None
    on_bind = None
    on_unbind = None

    def __init__(self, config, clock):
        self.config = config
        self.clock = clock
        self.drops = Counter()
        self._leases = {}      # mac -> Lease (possibly expired until reclaimed)
        self._holder = {}      # address -> mac, for every entry of _leases
        self._previous = {}    # mac -> address it last held, oldest first
        self._declined = {}    # address -> time it may be offered again, oldest first
        self._expiries = []    # heap of (expiry, mac, address) for _leases, some stale
        self._offered = {}     # macs whose lease is an unanswered offer, oldest first
        static = [(mac, ip) for mac, ip in config.static_leases if ip.version == 4]
        self._static = dict(static)
        self._static_owner = {ip: mac for mac, ip in static}
        net = config.subnet
        self._reserved = {net.network_address, net.broadcast_address,
                          config.gateway, config.dns_server}
        # The free list: pool addresses never handed out are int(_next) up to
        # _pool_end; addresses handed back wait in _returned (a set beside it
        # keeps each once). A candidate is still checked with _usable.
        self._next = int(config.guest)
        self._pool_end = int(net.broadcast_address)
        self._returned = deque()
        self._returned_set = set()
        self._server_id = config.gateway.packed
        # Configuration options are the same in every reply, so build them once.
        opts = [(_D.DHCP_OPT_NETMASK, config.netmask.packed),
                (_D.DHCP_OPT_ROUTER, config.gateway.packed),
                (_D.DHCP_OPT_DNS_SVRS, config.dns_server.packed),
                (_D.DHCP_OPT_MTUSIZE, struct.pack("!H", config.mtu))]
        if config.domain:
            opts.append((_D.DHCP_OPT_DOMAIN, b".".join(dnsname.labels(config.domain))))
        if config.search:
            opts += _split(119, b"".join(encode_name(n) for n in config.search))
        self._config_opts = opts

    # -- queries ----------------------------------------------------------

    def leases(self) -> list:
        self._expire()
        return sorted(self._leases.values(), key=lambda lease: lease.address)

    def lease_for(self, mac: bytes):
        self._expire()
        return self._leases.get(mac)

    # -- input ------------------------------------------------------------

    def handle(self, payload: bytes):
        """Never raises: a guest must not be able to crash the stack."""
        try:
            msg = _D.DHCP(bytes(payload))
            opts = {}
            for code, value in msg.opts:
                opts.setdefault(code, value)     # first occurrence wins
        except Exception:
            self.drops["dhcp-malformed"] += 1
            return None
        if msg.magic != _D.DHCP_MAGIC:
            self.drops["dhcp-malformed"] += 1
            return None
        if msg.op != _D.DHCP_OP_REQUEST:
            self.drops["dhcp-not-request"] += 1
            return None
        if msg.hrd != 1 or msg.hln != 6 or not is_unicast(msg.chaddr):
            self.drops["dhcp-bad-hardware"] += 1
            return None
        if msg.giaddr:
            self.drops["dhcp-relayed"] += 1
            return None
        mtype = opts.get(_D.DHCP_OPT_MSGTYPE)
        if mtype is None or len(mtype) != 1:
            self.drops["dhcp-malformed"] += 1
            return None
        handler = {_D.DHCPDISCOVER: self._discover, _D.DHCPREQUEST: self._request,
                   _D.DHCPRELEASE: self._release, _D.DHCPDECLINE: self._decline,
                   _D.DHCPINFORM: self._inform}.get(mtype[0])
        if handler is None:
            self.drops["dhcp-unknown-type"] += 1
            return None
        self._expire()
        return handler(msg, opts)

    def _discover(self, msg, opts):
        mac = msg.chaddr
        address = self._choose(mac, _ip_opt(opts, _D.DHCP_OPT_REQ_IP))
        if address is None and self._reclaim_offer(mac):
            address = self._choose(mac)
        if address is None:
            self.drops["dhcp-pool-exhausted"] += 1
            return None
        lease = self._leases.get(mac)
        if not (lease and lease.state == "bound" and lease.address == address):
            self._store(Lease(mac, address, self.clock() + OFFER_HOLD, "offered",
                              _hostname(opts)))
        return self._reply(msg, _D.DHCPOFFER, address)

    def _request(self, msg, opts):
        mac = msg.chaddr
        server_id = opts.get(_D.DHCP_OPT_SERVER_ID)
        if server_id is not None and server_id != self._server_id:
            # The client took another server's offer: ours is free again.
            lease = self._leases.get(mac)
            if lease and lease.state == "offered":
                self._remove(mac)
            self.drops["dhcp-other-server"] += 1
            return None
        requested = _ip_opt(opts, _D.DHCP_OPT_REQ_IP)
        if requested is None and msg.ciaddr:
            requested = ipaddress.IPv4Address(msg.ciaddr)   # RENEWING/REBINDING
        if requested is None or not self._offered_to(mac, requested):
            self.drops["dhcp-nak-not-offered"] += 1
            return self._reply(msg, _D.DHCPNAK, None)
        lease = Lease(mac, requested, self.clock() + self.config.lease_time, "bound",
                      _hostname(opts) or getattr(self._leases.get(mac), "hostname", None))
        self._store(lease)
        reply = self._reply(msg, _D.DHCPACK, requested)
        if self.on_bind is not None:
            self.on_bind(lease)
        if self.on_lease is not None:
            self.on_lease(lease)
        return reply

    def _release(self, msg, opts):
        lease = self._leases.get(msg.chaddr)
        if lease and lease.address.packed == struct.pack("!I", msg.ciaddr):
            self._remove(msg.chaddr)
            self._unbound(lease)
        else:
            self.drops["dhcp-release-unknown"] += 1
        return None

    def _decline(self, msg, opts):
        """The client found the address in use (ARP): keep it out for a while."""
        address = _ip_opt(opts, _D.DHCP_OPT_REQ_IP)
        lease = self._leases.get(msg.chaddr)
        if lease is None or lease.address != address:
            self.drops["dhcp-decline-unknown"] += 1
            return None
        self._remove(msg.chaddr)
        self._unbound(lease)
        self._previous.pop(msg.chaddr, None)
        self._declined.pop(address, None)
        self._declined[address] = self.clock() + DECLINE_HOLD
        return None

    def _unbound(self, lease):
        if self.on_unbind is not None and lease.state == "bound":
            self.on_unbind(lease)

    def _inform(self, msg, opts):
        return self._reply(msg, _D.DHCPACK, None, lease_options=False)

    # -- allocation -------------------------------------------------------

    def _usable(self, address, mac) -> bool:
        """May ``mac`` have ``address`` now (pool membership aside)?"""
        return (address in self.config.subnet and address not in self._reserved
                and address not in self._declined
                and self._holder.get(address, mac) == mac
                and self._static_owner.get(address, mac) == mac)

    def _in_pool(self, address) -> bool:
        return self.config.guest <= address < self.config.subnet.broadcast_address

    def _offered_to(self, mac, address) -> bool:
        """Did the stack offer or lease ``address`` to ``mac`` (and may it
        have it now)? Only then is a REQUEST for it granted."""
        lease = self._leases.get(mac)
        known = (self._static.get(mac) == address
                 or (lease is not None and lease.address == address)
                 or self._previous.get(mac) == address)
        return known and self._usable(address, mac)

    def _choose(self, mac, requested=None):
        """RFC 2131 4.3.1 order: static, current, previous, requested, first free."""
        candidates = [self._static.get(mac),
                      getattr(self._leases.get(mac), "address", None),
                      self._previous.get(mac)]
        for address in candidates:
            if address is not None and self._usable(address, mac):
                return address
        if requested is not None and self._in_pool(requested) and self._usable(requested, mac):
            return requested
        return self._take_free(mac)

    def _reclaim_offer(self, mac) -> bool:
        """The pool is full: take back the oldest unanswered offer (not
        ``mac``'s), so a DISCOVER flood from made-up MACs cannot keep a real
        client out for OFFER_HOLD. Its client, if real, gets a NAK and starts over."""
        for other in self._offered:
            if other != mac:
                self._remove(other)
                self.drops["dhcp-offer-reclaimed"] += 1
                return True
        return False

    def _take_free(self, mac):
        """The next free pool address (returned ones first, lowest never-used
        otherwise), or None; O(1) amortized. An address taken here stays on
        the list's far side until a lease on it ends (_store/_remove)."""
        returned = self._returned
        while returned:
            address = returned[0]
            if self._usable(address, mac):
                return address
            returned.popleft()
            self._returned_set.discard(address)
        while self._next < self._pool_end:
            address = ipaddress.IPv4Address(self._next)
            if self._usable(address, mac):
                return address
            self._next += 1
        return None

    def _store(self, lease):
        self._remove(lease.mac)
        address = lease.address
        self._leases[lease.mac] = lease
        self._holder[address] = lease.mac
        if lease.state == "offered":
            self._offered[lease.mac] = None
        self._previous.pop(lease.mac, None)
        self._previous[lease.mac] = address
        if len(self._previous) > REMEMBERED:
            self._previous.pop(next(iter(self._previous)))
        if address in self._returned_set:
            # Left in the deque (skipped when reached: it is held); compact
            # when such leftovers outnumber the addresses really free.
            self._returned_set.discard(address)
            if len(self._returned) > 2 * len(self._returned_set) + 64:
                seen = set()
                self._returned = deque(a for a in self._returned if a in self._returned_set
                                       and not (a in seen or seen.add(a)))
        if int(address) == self._next:
            self._next += 1
        heapq.heappush(self._expiries, (lease.expiry, lease.mac, address))
        if len(self._expiries) > 2 * len(self._leases) + 64:
            # Renewals leave stale entries behind: rebuild from the leases.
            self._expiries = [(le.expiry, le.mac, le.address) for le in self._leases.values()]
            heapq.heapify(self._expiries)

    def _remove(self, mac):
        lease = self._leases.pop(mac, None)
        self._offered.pop(mac, None)
        if lease is not None:
            del self._holder[lease.address]
            self._give_back(lease.address)

    def _give_back(self, address):
        if self._in_pool(address) and address not in self._static_owner \
                and address not in self._returned_set and int(address) < self._next:
            self._returned.append(address)
            self._returned_set.add(address)

    def _expire(self):
        now = self.clock()
        for mac, lease in expired(self._expiries, self._leases, now):
            self._remove(mac)
            if self.on_unbind is not None and lease.state == "bound":
                self.on_unbind(lease)
        for address in undeclined(self._declined, now):
            self._give_back(address)

    # -- output -----------------------------------------------------------

    def _reply(self, req, mtype, address, lease_options=True):
        opts = [(_D.DHCP_OPT_MSGTYPE, bytes([mtype])),
                (_D.DHCP_OPT_SERVER_ID, self._server_id)]
        if mtype != _D.DHCPNAK:
            if lease_options:
                t = self.config.lease_time
                opts += [(_D.DHCP_OPT_LEASE_SEC, struct.pack("!I", t)),
                         (_D.DHCP_OPT_RENEWTIME, struct.pack("!I", t // 2)),
                         (_D.DHCP_OPT_REBINDTIME, struct.pack("!I", t * 7 // 8))]
            opts += self._config_opts
        yiaddr = address.packed if address is not None else ZERO_IP
        ciaddr = req.ciaddr if mtype == _D.DHCPACK else 0
        msg = _D.DHCP(
            op=_D.DHCP_OP_REPLY, hrd=1, hln=6, hops=0, xid=req.xid, secs=0,
            flags=req.flags, ciaddr=ciaddr, yiaddr=struct.unpack("!I", yiaddr)[0],
            siaddr=int(self.config.gateway), giaddr=req.giaddr,
            chaddr=req.chaddr.ljust(16, b"\x00"), sname=b"\x00" * 64, file=b"\x00" * 128,
            magic=_D.DHCP_MAGIC, opts=opts, data=b"")
        payload = bytes(msg)
        payload = payload.ljust(MIN_BOOTP_LEN, b"\x00")
        # RFC 2131 4.1 (giaddr is always zero here: relayed requests are dropped).
        if mtype == _D.DHCPNAK:
            dst_ip, dst_mac = b"\xff" * 4, BROADCAST
        elif req.ciaddr:
            dst_ip, dst_mac = struct.pack("!I", req.ciaddr), req.chaddr
        elif req.flags & 0x8000:
            dst_ip, dst_mac = b"\xff" * 4, BROADCAST
        else:
            dst_ip, dst_mac = yiaddr, req.chaddr
        return DhcpReply(payload, dst_ip, dst_mac, mtype)


def _ip_opt(opts, code):
    value = opts.get(code)
    return ipaddress.IPv4Address(value) if value is not None and len(value) == 4 else None


def _hostname(opts):
    value = opts.get(_D.DHCP_OPT_HOSTNAME)
    if not value:
        return None
    return value.decode("utf-8", "replace").strip("\x00").strip() or None


@implementer(IUDPService)
class DhcpHandler:
    """Connects DhcpServer to the dispatcher: UDP port 67, any destination."""

    udp_port = 67
    local_only = False

    def __init__(self, dispatcher, config, clock):
        self.dispatcher = dispatcher
        self.core = DhcpServer(config, clock)
        self.server_ip = config.gateway.packed

        neighbours = dispatcher.framer.neighbours
        self.core.on_bind = lambda lease: self._bound(lease)
        self.core.on_unbind = lambda lease: neighbours.unbind(lease.address.packed, lease.mac)

    def _bound(self, lease):
        """Tell the neighbour table: ``lease.mac`` owns the address now."""
        framer = self.dispatcher.framer
        framer.neighbours.bind(lease.address.packed, lease.mac,
                               framer.clock() + (lease.expiry - self.core.clock()))
        framer.learn(lease.address.packed, lease.mac)

    def handle_datagram(self, frame, ip, src_port, payload):
        reply = self.core.handle(bytes(payload))
        if reply is not None:
            self.dispatcher.framer.send_udp(self.server_ip, reply.dst_ip, 67, 68, reply.payload,
                                            dst_mac=reply.dst_mac)
