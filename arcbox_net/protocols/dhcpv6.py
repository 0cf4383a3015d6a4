"""DHCPv6 server core (RFC 8415), sans-I/O: a client message in, the reply out.

The RA's M and O flags send guests here: stateful addresses (IA_NA) from a
pool starting at fd00::2, a static address per MAC, and DNS servers
(option 23) and the domain list (option 24, RFC 3646) for everyone,
Information-Request included. Like dhcp.py: a binding is keyed by what the
client names it with (DUID and IAID); its MAC is the Ethernet source the
caller passes, or the one in a DUID-LL/LLT -- the frame's source comes first
because a DUID-LLT is made once and kept, so a cloned VM carries another
machine's MAC in it. Advertised addresses are held briefly (``OFFER_HOLD``)
so two clients soliciting together get distinct ones; a declined address
stays out of the pool for ``DECLINE_HOLD``. Memory is bounded: at most
``max_bindings`` bindings (offers included) and ``per_mac`` of them per MAC,
remembered and declined addresses capped too; expired bindings are reclaimed
lazily from a heap on every call.

No relays: the stack is on the guest's link, so Relay-Forward is dropped.
The reply goes back to the client's source address and port 546; the caller
wraps it in UDP/IPv6/Ethernet. Input is untrusted: options are parsed with
bounds checks here (dpkt has no DHCPv6) and anything malformed or not meant
for this server is counted in ``drops`` and answered with None.
"""

import heapq
import ipaddress
import struct
from collections import Counter, OrderedDict, deque

import attrs
from zope.interface import implementer

from ..interfaces import IUDP6Service
from ..wire import MalformedFrame, dnsname, ipv6
from .leasing import expired, undeclined
from .ndp import search_list

CLIENT_PORT = 546
SERVER_PORT = 547

SOLICIT = 1
ADVERTISE = 2
REQUEST = 3
CONFIRM = 4
RENEW = 5
REBIND = 6
REPLY = 7
RELEASE = 8
DECLINE = 9
RECONFIGURE = 10
INFORMATION_REQUEST = 11
RELAY_FORW = 12
RELAY_REPL = 13

OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_IAADDR = 5
OPT_ORO = 6
OPT_PREFERENCE = 7
OPT_ELAPSED_TIME = 8
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_DNS_SERVERS = 23
OPT_DOMAIN_LIST = 24
OPT_IA_PD = 25
OPT_INFORMATION_REFRESH_TIME = 32

STATUS_SUCCESS = 0
STATUS_UNSPEC_FAIL = 1
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NO_BINDING = 3
STATUS_NOT_ON_LINK = 4
STATUS_USE_MULTICAST = 5

DUID_LLT = 1
DUID_EN = 2
DUID_LL = 3
DUID_UUID = 4
HWTYPE_ETHERNET = 1

OFFER_HOLD = 30.0       # seconds an advertised address is held for its client
DECLINE_HOLD = 600.0    # seconds a declined address stays out of the pool
#: Clients (DUID, IAID) whose last address is remembered, at most.
REMEMBERED = 4096
#: A DUID is at most 128 bytes after its type (RFC 8415 11.1).
MAX_DUID = 130

_OPT = struct.Struct("!HH")
_IA = struct.Struct("!III")
_IAADDR = struct.Struct("!16sII")


@attrs.frozen
class Binding:
    duid: bytes
    iaid: int
    address: ipaddress.IPv6Address
    mac: bytes | None
    expiry: float        # clock() time; for an offer, when the offer lapses
    state: str           # "offered" | "bound"


@attrs.frozen
class Dhcpv6Reply:
    payload: bytes       # UDP payload, from port 547 to the client's port 546
    message_type: int


# -- wire format -----------------------------------------------------------

def parse_options(data):
    """[(code, value)] of a run of DHCPv6 options; raises MalformedFrame
    ("dhcpv6-malformed") when an option runs past the end."""
    out = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise MalformedFrame("dhcpv6-malformed", "option header past the end")
        code, size = _OPT.unpack_from(data, pos)
        if pos + 4 + size > end:
            raise MalformedFrame("dhcpv6-malformed", f"option {code} past the end")
        out.append((code, bytes(data[pos + 4:pos + 4 + size])))
        pos += 4 + size
    return out


def option(code, value=b""):
    if len(value) > 0xFFFF:
        raise ValueError(f"DHCPv6 option {code} of {len(value)} bytes")
    return _OPT.pack(code, len(value)) + bytes(value)


def message(msg_type, xid, options):
    """A client/server message: type, 3-byte transaction id, encoded options."""
    return bytes((msg_type,)) + (xid & 0xFFFFFF).to_bytes(3, "big") + b"".join(options)


def parse_message(payload):
    """(type, xid, options) of a client/server message."""
    if len(payload) < 4:
        raise MalformedFrame("dhcpv6-malformed", "shorter than its header")
    return payload[0], int.from_bytes(payload[1:4], "big"), parse_options(payload[4:])


def duid_ll(mac):
    return struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + bytes(mac)


def duid_llt(mac, time):
    return struct.pack("!HHI", DUID_LLT, HWTYPE_ETHERNET, time & 0xFFFFFFFF) + bytes(mac)


def duid_mac(duid):
    """The Ethernet MAC in a DUID-LL or DUID-LLT, else None."""
    if len(duid) == 10 and duid[:4] == struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET):
        return bytes(duid[4:])
    if len(duid) == 14 and duid[:4] == struct.pack("!HH", DUID_LLT, HWTYPE_ETHERNET):
        return bytes(duid[8:])
    return None


def ia_na(iaid, t1, t2, options=()):
    return option(OPT_IA_NA, _IA.pack(iaid, t1, t2) + b"".join(options))


def iaaddr(address, preferred, valid, options=()):
    return option(OPT_IAADDR, _IAADDR.pack(address, preferred, valid) + b"".join(options))


def status(code, text=""):
    return option(OPT_STATUS_CODE, struct.pack("!H", code) + text.encode("utf-8"))


@attrs.frozen
class IaNa:
    iaid: int
    t1: int
    t2: int
    #: (16-byte address, preferred, valid) per IAADDR option inside.
    addresses: tuple
    status: int | None


def parse_ia_na(value):
    if len(value) < 12:
        raise MalformedFrame("dhcpv6-malformed", "IA_NA shorter than 12 bytes")
    iaid, t1, t2 = _IA.unpack_from(value)
    addresses = []
    code = None
    for sub, body in parse_options(value[12:]):
        if sub == OPT_IAADDR:
            if len(body) < 24:
                raise MalformedFrame("dhcpv6-malformed", "IAADDR shorter than 24 bytes")
            parse_options(body[24:])
            addresses.append(_IAADDR.unpack_from(body))
        elif sub == OPT_STATUS_CODE:
            code = parse_status(body)[0]
    return IaNa(iaid, t1, t2, tuple(addresses), code)


def parse_status(value):
    if len(value) < 2:
        raise MalformedFrame("dhcpv6-malformed", "status code shorter than 2 bytes")
    return struct.unpack_from("!H", value)[0], bytes(value[2:]).decode("utf-8", "replace")


def parse_oro(value):
    if len(value) % 2:
        raise MalformedFrame("dhcpv6-malformed", "odd ORO length")
    return {struct.unpack_from("!H", value, i)[0] for i in range(0, len(value), 2)}


# -- the server ------------------------------------------------------------

class Dhcpv6Server:
    """Bindings and message handling; see the module docstring.

    ``handle(payload, src_mac=None) -> Dhcpv6Reply | None`` never raises.
    ``on_bind(binding)`` / ``on_unbind(binding)`` (optional) tell the
    neighbour table which MAC owns which address, as DhcpServer's do.
    """

    on_bind = None
    on_unbind = None

    def __init__(self, server_mac, clock, *, subnet=ipv6.DEFAULT_SUBNET,
                 first=ipv6.DEFAULT_FIRST_GUEST, reserved=(ipv6.DEFAULT_GATEWAY,),
                 dns=(ipv6.DEFAULT_GATEWAY,), search=(), static_leases=(),
                 preferred_lifetime=3600, valid_lifetime=7200, max_bindings=1024, per_mac=8):
        self.clock = clock
        self.subnet = ipaddress.IPv6Network(subnet)
        self.first = ipaddress.IPv6Address(first)
        if self.first not in self.subnet:
            raise ValueError(f"first address {self.first} is outside {self.subnet}")
        if not 0 < preferred_lifetime <= valid_lifetime:
            raise ValueError("preferred lifetime must be positive and at most the valid one")
        self.duid = duid_ll(server_mac)
        self.preferred_lifetime = preferred_lifetime
        self.valid_lifetime = valid_lifetime
        # RFC 8415 21.4: T1 0.5 and T2 0.8 times the shortest preferred lifetime.
        self.t1 = preferred_lifetime // 2
        self.t2 = preferred_lifetime * 4 // 5
        self.max_bindings = max_bindings
        self.per_mac = per_mac
        self.drops = Counter()
        self._reserved = {self.subnet.network_address, *map(ipaddress.IPv6Address, reserved)}
        self._static = {bytes(mac): ipaddress.IPv6Address(a) for mac, a in static_leases}
        self._static_owner = {a: mac for mac, a in self._static.items()}
        self._bindings = {}             # (duid, iaid) -> Binding
        self._holder = {}               # address -> (duid, iaid)
        self._per_mac = Counter()       # mac -> bindings
        self._previous = OrderedDict()  # (duid, iaid) -> address it last held
        self._declined = OrderedDict()  # address -> time it may be used again
        self._expiries = []             # heap of (expiry, key, address), some stale
        self._next = int(self.first)
        self._returned = deque()
        self._returned_set = set()
        self._config = {}
        if dns:
            self._config[OPT_DNS_SERVERS] = option(
                OPT_DNS_SERVERS, b"".join(ipv6.packed(a) for a in dns))
        if search:
            self._config[OPT_DOMAIN_LIST] = option(OPT_DOMAIN_LIST, dnsname.encode_list(search))

    # -- queries ----------------------------------------------------------

    def bindings(self):
        self._expire()
        return sorted(self._bindings.values(), key=lambda b: b.address)

    def binding_for(self, duid, iaid):
        self._expire()
        return self._bindings.get((duid, iaid))

    def is_declined(self, address):
        self._expire()
        return ipaddress.IPv6Address(address) in self._declined

    # -- input ------------------------------------------------------------

    def handle(self, payload, src_mac=None):
        if payload[:1] in (bytes((RELAY_FORW,)), bytes((RELAY_REPL,))):
            # Another layout (hop count, link and peer addresses); no relay is on our link.
            self.drops["dhcpv6-relayed"] += 1
            return None
        try:
            msg_type, xid, options = parse_message(bytes(payload))
            opts = {}
            for code, value in options:
                opts.setdefault(code, value)     # first occurrence wins
            ias = [parse_ia_na(v) for c, v in options if c == OPT_IA_NA]
            oro = parse_oro(opts[OPT_ORO]) if OPT_ORO in opts else set()
            if OPT_ELAPSED_TIME in opts and len(opts[OPT_ELAPSED_TIME]) != 2:
                raise MalformedFrame("dhcpv6-malformed", "elapsed time length")
        except MalformedFrame:
            self.drops["dhcpv6-malformed"] += 1
            return None
        handler = {SOLICIT: self._solicit, REQUEST: self._request, RENEW: self._renew,
                   REBIND: self._rebind, RELEASE: self._release, DECLINE: self._decline,
                   CONFIRM: self._confirm,
                   INFORMATION_REQUEST: self._information}.get(msg_type)
        if handler is None:
            self.drops["dhcpv6-not-client"] += 1
            return None
        client = opts.get(OPT_CLIENTID)
        server = opts.get(OPT_SERVERID)
        if client is not None and not 2 < len(client) <= MAX_DUID:
            self.drops["dhcpv6-malformed"] += 1
            return None
        # RFC 8415 16: which messages must, may or must not name a server.
        needs_server = msg_type in (REQUEST, RENEW, RELEASE, DECLINE)
        no_server = msg_type in (SOLICIT, REBIND, CONFIRM)
        if (client is None and msg_type != INFORMATION_REQUEST) \
                or (needs_server and server is None) or (no_server and server is not None) \
                or (msg_type == INFORMATION_REQUEST and ias):
            self.drops["dhcpv6-invalid"] += 1
            return None
        if server is not None and server != self.duid:
            self.drops["dhcpv6-other-server"] += 1
            return None
        self._expire()
        mac = src_mac or (duid_mac(client) if client else None)
        return handler(msg_type, xid, opts, ias, oro, client, mac)

    def _reply(self, msg_type, xid, client, body, oro):
        options = [option(OPT_SERVERID, self.duid)]
        if client is not None:
            options.append(option(OPT_CLIENTID, client))
        options += body
        options += [value for code, value in self._config.items() if code in oro]
        return Dhcpv6Reply(message(msg_type, xid, options), msg_type)

    def _ia_with(self, iaid, binding):
        return ia_na(iaid, self.t1, self.t2, [
            iaaddr(binding.address.packed, self.preferred_lifetime, self.valid_lifetime)])

    def _assign(self, client, ia, mac, state):
        """The IA_NA option answering ``ia``: an address bound (or offered)
        to the client, or the NoAddrsAvail status."""
        key = (client, ia.iaid)
        hints = [ipaddress.IPv6Address(a) for a, _p, _v in ia.addresses]
        address = self._choose(key, mac, hints)
        if address is None:
            return ia_na(ia.iaid, 0, 0, [status(STATUS_NO_ADDRS_AVAIL, "no addresses left")])
        lifetime = OFFER_HOLD if state == "offered" else self.valid_lifetime
        current = self._bindings.get(key)
        if state == "offered" and current is not None and current.state == "bound" \
                and current.address == address:
            binding = current
        else:
            binding = self._store(Binding(client, ia.iaid, address, mac,
                                          self.clock() + lifetime, state))
        return self._ia_with(ia.iaid, binding)

    def _solicit(self, msg_type, xid, opts, ias, oro, client, mac):
        if not ias:
            return self._reply(ADVERTISE, xid, client,
                               [status(STATUS_NO_ADDRS_AVAIL, "only IA_NA is served")], oro)
        rapid = OPT_RAPID_COMMIT in opts
        body = [self._assign(client, ia, mac, "bound" if rapid else "offered") for ia in ias]
        if rapid:
            return self._reply(REPLY, xid, client, [option(OPT_RAPID_COMMIT), *body], oro)
        # Preference 255: the only server of the link; the client need not wait for others.
        return self._reply(ADVERTISE, xid, client, [option(OPT_PREFERENCE, b"\xff"), *body], oro)

    def _request(self, msg_type, xid, opts, ias, oro, client, mac):
        if not ias:
            return self._reply(REPLY, xid, client,
                               [status(STATUS_NO_ADDRS_AVAIL, "only IA_NA is served")], oro)
        body = [self._assign(client, ia, mac, "bound") for ia in ias]
        return self._reply(REPLY, xid, client, body, oro)

    def _extend(self, client, ia, mac, rebinding):
        """RFC 8415 18.3.4/18.3.5: extend the binding; one the server lost (a
        restart) is made again when its address may still be the client's;
        addresses not (or no longer) the client's go back with lifetime 0."""
        key = (client, ia.iaid)
        binding = self._bindings.get(key)
        requested = [ipaddress.IPv6Address(a) for a, _p, _v in ia.addresses]
        if binding is None or binding.state != "bound":
            usable = [a for a in requested
                      if self._in_pool(a) and self._usable(a, key, mac) and self._fits(key, mac)]
            if not usable:
                if not rebinding:
                    return ia_na(ia.iaid, 0, 0, [status(STATUS_NO_BINDING, "no binding")])
                return ia_na(ia.iaid, 0, 0, [iaaddr(a.packed, 0, 0) for a in requested])
            address = usable[0]
        else:
            address = binding.address
        binding = self._store(Binding(client, ia.iaid, address, mac,
                                      self.clock() + self.valid_lifetime, "bound"))
        stale = [iaaddr(a.packed, 0, 0) for a in requested if a != address]
        return ia_na(ia.iaid, self.t1, self.t2, [
            iaaddr(address.packed, self.preferred_lifetime, self.valid_lifetime), *stale])

    def _renew(self, msg_type, xid, opts, ias, oro, client, mac):
        body = [self._extend(client, ia, mac, rebinding=False) for ia in ias]
        return self._reply(REPLY, xid, client, body, oro)

    def _rebind(self, msg_type, xid, opts, ias, oro, client, mac):
        body = [self._extend(client, ia, mac, rebinding=True) for ia in ias]
        return self._reply(REPLY, xid, client, body, oro)

    def _release(self, msg_type, xid, opts, ias, oro, client, mac):
        body = []
        for ia in ias:
            binding = self._bindings.get((client, ia.iaid))
            if binding is None or all(binding.address.packed != a for a, _p, _v in ia.addresses):
                self.drops["dhcpv6-release-unknown"] += 1
                body.append(ia_na(ia.iaid, 0, 0, [status(STATUS_NO_BINDING, "no binding")]))
                continue
            self._remove((client, ia.iaid))
        return self._reply(REPLY, xid, client, [status(STATUS_SUCCESS, "released"), *body], oro)

    def _decline(self, msg_type, xid, opts, ias, oro, client, mac):
        """The client found the address in use (DAD): keep it out for a while."""
        body = []
        for ia in ias:
            key = (client, ia.iaid)
            binding = self._bindings.get(key)
            if binding is None or all(binding.address.packed != a for a, _p, _v in ia.addresses):
                self.drops["dhcpv6-decline-unknown"] += 1
                body.append(ia_na(ia.iaid, 0, 0, [status(STATUS_NO_BINDING, "no binding")]))
                continue
            self._remove(key)
            self._previous.pop(key, None)
            self._declined.pop(binding.address, None)
            self._declined[binding.address] = self.clock() + DECLINE_HOLD
            if len(self._declined) > self.max_bindings:
                address, _until = self._declined.popitem(last=False)
                self._give_back(address)
        return self._reply(REPLY, xid, client, [status(STATUS_SUCCESS, "declined"), *body], oro)

    def _confirm(self, msg_type, xid, opts, ias, oro, client, mac):
        """RFC 8415 18.3.3: are the client's addresses still on this link?"""
        addresses = [ipaddress.IPv6Address(a) for ia in ias for a, _p, _v in ia.addresses]
        if not addresses:
            self.drops["dhcpv6-confirm-empty"] += 1
            return None
        if all(a in self.subnet for a in addresses):
            return self._reply(REPLY, xid, client, [status(STATUS_SUCCESS, "on link")], oro)
        return self._reply(REPLY, xid, client, [status(STATUS_NOT_ON_LINK, "not on link")], oro)

    def _information(self, msg_type, xid, opts, ias, oro, client, mac):
        return self._reply(REPLY, xid, client, [], oro)

    # -- allocation -------------------------------------------------------

    def _usable(self, address, key, mac):
        """May ``key`` (from ``mac``) have ``address`` now? A static address
        goes to its MAC whatever the DUID: a guest that changed DHCP clients
        takes it over from the binding its old DUID left."""
        owner = self._static_owner.get(address)
        return (owner in (None, mac) and address in self.subnet
                and address not in self._reserved
                and address not in self._declined
                and (self._holder.get(address, key) == key or owner is not None))

    def _in_pool(self, address):
        return address in self.subnet and address >= self.first

    def _fits(self, key, mac):
        """Room for one more binding (one the key already has costs nothing)?"""
        if key in self._bindings:
            return True
        if len(self._bindings) >= self.max_bindings:
            self.drops["dhcpv6-bindings-full"] += 1
            return False
        if mac is not None and self._per_mac[mac] >= self.per_mac:
            self.drops["dhcpv6-mac-bindings-full"] += 1
            return False
        return True

    def _choose(self, key, mac, hints):
        """Static, current, previous, a hint from the pool, first free."""
        if not self._fits(key, mac):
            return None
        candidates = [self._static.get(mac) if mac is not None else None,
                      getattr(self._bindings.get(key), "address", None),
                      self._previous.get(key)]
        for address in candidates:
            if address is not None and self._usable(address, key, mac):
                return address
        for address in hints:
            if self._in_pool(address) and self._usable(address, key, mac):
                return address
        return self._take_free(key, mac)

    def _take_free(self, key, mac):
        returned = self._returned
        while returned:
            address = returned[0]
            if self._usable(address, key, mac):
                return address
            returned.popleft()
            self._returned_set.discard(address)
        last = int(self.subnet.broadcast_address)
        while self._next <= last:
            address = ipaddress.IPv6Address(self._next)
            if self._usable(address, key, mac):
                return address
            self._next += 1
        self.drops["dhcpv6-pool-exhausted"] += 1
        return None

    def _store(self, binding):
        key = (binding.duid, binding.iaid)
        old = self._bindings.get(key)
        if old is not None and old.address != binding.address:
            self._remove(key)
        elif old is not None:
            self._per_mac[old.mac] -= 1
        address = binding.address
        holder = self._holder.get(address)
        if holder is not None and holder != key:
            self._remove(holder)          # a static address taken over by its MAC
        self._bindings[key] = binding
        self._holder[address] = key
        self._per_mac[binding.mac] += 1
        self._previous.pop(key, None)
        self._previous[key] = address
        if len(self._previous) > REMEMBERED:
            self._previous.popitem(last=False)
        self._returned_set.discard(address)
        if int(address) == self._next:
            self._next += 1
        heapq.heappush(self._expiries, (binding.expiry, key, address))
        if len(self._expiries) > 2 * len(self._bindings) + 64:
            self._expiries = [(b.expiry, k, b.address) for k, b in self._bindings.items()]
            heapq.heapify(self._expiries)
        if binding.state == "bound" and self.on_bind is not None:
            # Every grant and renewal: the neighbour table keeps the new expiry.
            self.on_bind(binding)
        return binding

    def _remove(self, key):
        binding = self._bindings.pop(key, None)
        if binding is None:
            return
        del self._holder[binding.address]
        self._per_mac[binding.mac] -= 1
        if self._per_mac[binding.mac] <= 0:
            del self._per_mac[binding.mac]
        self._give_back(binding.address)
        if binding.state == "bound" and self.on_unbind is not None:
            self.on_unbind(binding)

    def _give_back(self, address):
        if self._in_pool(address) and address not in self._static_owner \
                and address not in self._returned_set and int(address) < self._next:
            self._returned.append(address)
            self._returned_set.add(address)
            if len(self._returned) > 2 * len(self._returned_set) + 64:
                seen = set()
                self._returned = deque(a for a in self._returned if a in self._returned_set
                                       and not (a in seen or seen.add(a)))

    def _expire(self):
        now = self.clock()
        for key, _binding in expired(self._expiries, self._bindings, now):
            self._remove(key)
        for address in undeclined(self._declined, now):
            self._give_back(address)


@implementer(IUDP6Service)
class Dhcpv6Handler:
    """Connects Dhcpv6Server to the dispatcher: UDP port 547 to the
    All_DHCP_Relay_Agents_and_Servers group (ff02::1:2) or an owned address;
    replies from fe80::1 to the client's address and port 546, and every
    binding told to the neighbour table."""

    udp_port = SERVER_PORT
    local_only = True

    def __init__(self, dispatcher, config, clock):
        self.dispatcher = dispatcher
        self.framer = dispatcher.framer
        self.server_ip = config.router_link_local.packed
        static = [(mac, address) for mac, address in config.static_leases
                  if address.version == 6]
        self.core = Dhcpv6Server(
            config.gateway_mac, clock, subnet=config.ipv6_subnet, first=config.guest6,
            reserved=(config.gateway6, config.dns6), dns=(config.dns6,),
            search=search_list(config.domain, config.search), static_leases=static)
        neighbours = self.framer.neighbours
        self.core.on_bind = self._bound
        self.core.on_unbind = lambda b: b.mac and neighbours.unbind(b.address.packed, b.mac)

    def _bound(self, binding):
        if binding.mac is None:
            return
        framer = self.framer
        framer.neighbours.bind(binding.address.packed, binding.mac,
                               framer.clock() + (binding.expiry - self.core.clock()))

    def handle_datagram(self, frame, ip, src_port, payload):
        if len(ip.src) != 16:
            raise MalformedFrame("dhcpv6-over-ipv4")
        reply = self.core.handle(payload, bytes(frame[6:12]))
        if reply is not None:
            self.framer.send_udp(self.server_ip, bytes(ip.src), SERVER_PORT, src_port,
                                 reply.payload, dst_mac=bytes(frame[6:12]))
