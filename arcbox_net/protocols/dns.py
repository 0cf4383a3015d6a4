"""DNS on the gateway: a caching resolver proxy built on twisted.names.

Theory of operation
-------------------
``DnsResolverProxy`` is a ``twisted.names.server.DNSServerFactory`` whose
resolver chain is: the local authority (host.arcbox.internal and friends,
``--dns-record``), then a bounded cache, then the upstream servers
(``--dns-upstream``, or the host's /etc/resolv.conf through
``client.Resolver(resolv=...)``, which re-reads the file when it changes).
Every upstream lookup is bounded by ``config.dns_timeout``: past it the guest
gets SERVFAIL. Everything is asynchronous, so a slow upstream never stalls the
datapath.

The proxy takes raw DNS messages (``answer(payload)``) and fires a Deferred
with the wire reply, so the protocol logic is tested without sockets: the
query goes through ``handleQuery`` with a tiny protocol object whose
``writeMessage`` captures the response. twisted.names neither truncates nor
speaks EDNS as a server, so this module does both: the reply keeps the id,
question, RD and CD bits, carries an OPT record when the query had one, and
over UDP fits 512 bytes or the client's EDNS size (capped by the link MTU),
dropping additional then authority records and finally cutting answers with
TC set. Malformed queries are dropped and counted, never raised; a query
whose name has a label over 63 bytes or is over 255 bytes on the wire (RFC
1035 2.3.4) gets FORMERR and never goes upstream. An upstream socket that
cannot be opened (no file descriptors left) is SERVFAIL, counted as
``dns-upstream-no-socket``, and one rate-limited log line.

``DnsHandler`` connects the proxy to the dispatcher (UDP port 53 on the
stack's own addresses, IPv6 ones too: fd00::1 by default) and runs the same
proxy as a TCP listener on 127.0.0.1, announced to the TCP NAT with
``Egress.add_local_service`` so that guest TCP to gateway:53 (and to
[fd00::1]:53) is spliced onto it.

IPv6 (issue 16): with ``config.ipv6`` the local names answer AAAA with the
IPv6 gateway beside A with the IPv4 one; ``--dns-record NAME=V6ADDR`` is an
AAAA record; a name with records of one family only is NOERROR without data
for the other (never NXDOMAIN); reverse names of IPv6 addresses live under
ip6.arpa. IPv6 upstreams (``--dns-upstream [::1]:5353``) are asked from an
IPv6 socket (twisted.names picks the family by the server's address).

Upstream queries share a UDP port per family (``PooledResolver``), renewed
after ``QUERIES_PER_PORT`` queries but not more than once a second:
twisted.names' client opens a port per query and Twisted logs every port's
opening and closing, so a guest asking for unique names would write four
log lines per query; now it is at most two a second, and the source port
still changes every hundred queries (the query id is random per query).
"""

import errno
import ipaddress
import struct
from collections import Counter

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.names import authority, cache, client, common, dns, error, server
from zope.interface import implementer

from ..interfaces import IUDP6Service, IUDPService
from ..ratelimit import LimitedLog

#: Lines a guest can cause per query, rate-limited (ratelimit.py).
_limited_log = LimitedLog(Logger(namespace=__name__))

#: Zone the stack is authoritative for: unknown names in it are NXDOMAIN.
LOCAL_ZONE = "arcbox.internal"
#: Names that always resolve to the gateway (the host, seen from the guest):
#: A the IPv4 gateway, AAAA the IPv6 one (when IPv6 is on).
GATEWAY_NAMES = ("host.arcbox.internal", "gateway.arcbox.internal",
                 "host.docker.internal", "host.containers.internal")
LOCAL_TTL = 60
#: Largest EDNS UDP payload the stack announces and sends.
MAX_EDNS_PAYLOAD = 4096
#: IP and UDP header bytes of a reply, by address length: what the MTU leaves.
_UDP_OVERHEAD = {4: 20 + 8, 16: 40 + 8}
MAX_STREAM_PAYLOAD = 65535
#: Upstream lookups (and TCP queries) in flight at once; more are dropped.
MAX_PENDING = 1024
#: Entries of the answer cache; the oldest is evicted beyond it.
MAX_CACHE_ENTRIES = 4096
#: Seconds an idle DNS-over-TCP connection stays open.
TCP_IDLE_TIMEOUT = 10.0
#: RFC 1035 2.3.4: a label is at most 63 bytes, a name at most 255 on the wire.
MAX_LABEL = 63
MAX_NAME = 255

_HEADER = struct.Struct("!HHHHHH")
_RCODE_NAMES = {dns.OK: "noerror", dns.EFORMAT: "formerr", dns.ESERVER: "servfail",
                dns.ENAME: "nxdomain", dns.ENOTIMP: "notimp", dns.EREFUSED: "refused"}
_BADVERS = 16
_ZONE_TRANSFER = (dns.AXFR, dns.IXFR)


class MalformedQuery(ValueError):
    """A DNS message the proxy will not answer; ``reason`` is its drop counter."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Edns:
    """What a query's OPT record said."""

    __slots__ = ("udp_size", "version", "dnssec_ok")

    def __init__(self, udp_size, version, dnssec_ok):
        self.udp_size = udp_size
        self.version = version
        self.dnssec_ok = dnssec_ok


class _OptRecord:
    """The reply's OPT pseudo-record (RFC 6891 6.1.2), as an IEncodable."""

    type = dns.OPT

    def __init__(self, udp_size, extended_rcode=0):
        self.udp_size = udp_size
        self.extended_rcode = extended_rcode

    def encode(self, strio, compDict=None):
        # Root name, type OPT, class = UDP size, TTL = ext-rcode/version/flags
        # (version 0, DO clear: no DNSSEC here), no options.
        strio.write(b"\x00" + struct.pack("!HHIH", dns.OPT, self.udp_size,
                                          self.extended_rcode << 24, 0))


def parse_query(payload):
    """Decode a query; return (dns.Message, Edns or None) or raise MalformedQuery."""
    if len(payload) < _HEADER.size:
        raise MalformedQuery("dns-short")
    _id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(payload)
    if flags & 0x8000:
        raise MalformedQuery("dns-not-query")
    if qdcount != 1:
        raise MalformedQuery("dns-malformed")
    message = dns.Message()
    try:
        message.fromStr(bytes(payload))
    except Exception:
        raise MalformedQuery("dns-malformed") from None
    # Message.decode stops quietly at the end of the data: check it got all.
    if (len(message.queries) != 1 or len(message.answers) != ancount
            or len(message.authority) != nscount or len(message.additional) != arcount):
        raise MalformedQuery("dns-malformed")
    opts = [r for r in message.additional if r.type == dns.OPT]
    if len(opts) > 1:
        raise MalformedQuery("dns-malformed")
    edns = None
    if opts:
        opt = opts[0]
        edns = Edns(udp_size=opt.cls, version=(opt.ttl >> 16) & 0xFF,
                    dnssec_ok=bool(opt.ttl & 0x8000))
    message.additional = [r for r in message.additional if r.type != dns.OPT]
    return message, edns


def valid_name(name):
    """Is ``name`` (twisted's dotted bytes) within RFC 1035's size limits?"""
    if not name:
        return True
    labels = name.split(b".")
    if len(name) + 2 > MAX_NAME:      # wire form: a length byte per label, a root byte
        return False
    return all(len(label) <= MAX_LABEL for label in labels)


def encode_reply(response, limit, opt=None):
    """Wire form of ``response`` in at most ``limit`` bytes; (bytes, truncated).

    Over the limit, additional records go first, then authority records
    (neither needs TC); then answers are cut and TC is set.
    """
    answers = list(response.answers)
    authority = list(response.authority)
    additional = [r for r in response.additional if r.type != dns.OPT]
    tail = [opt] if opt is not None else []

    def build(ans, auth, add, tc):
        response.answers, response.authority, response.additional = ans, auth, add + tail
        response.trunc = tc
        response.maxSize = 0     # twisted's own truncation cuts mid-record
        return response.toStr()

    wire = build(answers, authority, additional, 0)
    if len(wire) <= limit:
        return wire, False
    for auth in (authority, []):
        wire = build(answers, auth, [], 0)
        if len(wire) <= limit:
            return wire, False
    lo, hi = 0, len(answers) - 1      # the most answers that fit with TC set
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(build(answers[:mid], [], [], 1)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return build(answers[:lo], [], [], 1), True


class LocalAuthority(authority.FileAuthority):
    """The stack's own names; authoritative for ``arcbox.internal``.

    Names it has answer with their A and AAAA records (any other type:
    NOERROR, no answer, the zone's SOA for negative caching); other names
    in arcbox.internal are NXDOMAIN; everything else goes on down the chain.
    Reverse (PTR) names of the local addresses (in-addr.arpa, ip6.arpa)
    answer the first local name.
    """

    def __init__(self, config, ttl=LOCAL_TTL):
        self._config = config
        self._ttl = ttl
        super().__init__(None)

    def loadFile(self, filename):
        ttl = self._ttl
        config = self._config
        gateways = [str(config.gateway)]
        if config.ipv6:
            gateways.append(str(config.gateway6))
        entries = {name: list(gateways) for name in GATEWAY_NAMES}
        overridden = set()
        for name, address in self._config.dns_records:
            if name in entries and name not in overridden:
                entries[name] = []           # --dns-record replaces a built-in name
            overridden.add(name)
            if str(address) not in entries.setdefault(name, []):
                entries[name].append(str(address))    # compressed text: one per address
        zone = LOCAL_ZONE.encode()
        self.soa = (zone, dns.Record_SOA(
            mname=b"gateway." + zone, rname=b"hostmaster." + zone, serial=1,
            refresh=3600, retry=600, expire=86400, minimum=ttl, ttl=ttl))
        self.records = {zone: [self.soa[1]]}
        reverse = {}
        for name, addresses in entries.items():
            try:
                key = name.encode("ascii" if name.isascii() else "idna").lower()
            except UnicodeError:
                key = name.encode("utf-8").lower()
            self.records[key] = [dns.Record_AAAA(a, ttl=ttl) if ":" in a
                                 else dns.Record_A(a, ttl=ttl) for a in addresses]
            for a in addresses:
                reverse.setdefault(a, key)
        # Empty non-terminals of the zone (e.g. a.arcbox.internal for
        # b.a.arcbox.internal) exist: NOERROR with no data, not NXDOMAIN.
        for key in list(self.records):
            if key.endswith(b"." + zone):
                parent = key.split(b".", 1)[1]
                while parent != zone and parent not in self.records:
                    self.records[parent] = []
                    parent = parent.split(b".", 1)[1]
        for address, name in reverse.items():
            ptr = ipaddress.ip_address(address).reverse_pointer
            self.records.setdefault(ptr.encode(), [dns.Record_PTR(name, ttl=ttl)])

    def _lookup(self, name, cls, type, timeout=None):
        key = name.lower()
        records = self.records.get(key)
        if records is None:
            return super()._lookup(name, cls, type, timeout)
        if records and (type == dns.ALL_RECORDS or any(r.TYPE == type for r in records)):
            return super()._lookup(name, cls, type, timeout)
        # No data (or an empty non-terminal, which FileAuthority cannot
        # find): NOERROR, no answer, and an SOA for negative caching owned by
        # our zone, or by the name itself when it lies outside the zone
        # (host.docker.internal): the SOA must enclose the name.
        zone = self.soa[0]
        owner = zone if key == zone or key.endswith(b"." + zone) else name
        return defer.succeed(([], [dns.RRHeader(owner, dns.SOA, dns.IN, self._ttl,
                                                self.soa[1], auth=True)], []))


class BoundedCache(cache.CacheResolver):
    """CacheResolver for upstream answers, with a size bound (oldest evicted).

    Authoritative records are the local authority's own (upstream records
    lose the AA bit): it answers first anyway, so they are not cached.
    """

    def __init__(self, reactor, max_entries=MAX_CACHE_ENTRIES):
        super().__init__(reactor=reactor)
        self.max_entries = max_entries

    def cacheResult(self, query, payload, cacheTime=None):
        if any(getattr(r, "auth", False) for section in payload for r in section):
            return
        if query not in self.cache:
            while len(self.cache) >= self.max_entries:
                oldest = next(iter(self.cache))
                call = self.cancel.pop(oldest, None)
                if call is not None and call.active():
                    call.cancel()
                del self.cache[oldest]
        super().cacheResult(query, payload, cacheTime)

    def clear(self):
        for call in self.cancel.values():
            if call.active():
                call.cancel()
        self.cancel.clear()
        self.cache.clear()


def retry_schedule(total):
    """Per-attempt timeouts for client.Resolver adding up to ``total`` seconds."""
    schedule, step, left = [], 1.0, float(total)
    while left > 1e-9:
        t = min(step, left)
        if left - t < 0.5:      # no tiny last attempt: fold it into this one
            t = left
        schedule.append(t)
        left -= t
        step *= 2
    return tuple(schedule)


#: Upstream queries sent from one UDP port before a fresh one is taken.
QUERIES_PER_PORT = 100
#: ... but a port serves at least this many seconds (bounds the log lines).
MIN_PORT_LIFE = 1.0


class PooledResolver(client.Resolver):
    """client.Resolver whose UDP queries share one quiet port per family.

    Overrides ``_query`` (twisted.names' per-query port); the port's
    protocol is not ``noisy``. A retired port closes once its last query is
    answered or given up.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ports = {}        # family (4 or 6) -> _QueryPort

    def _query(self, *args):
        family = 6 if ":" in args[0][0] else 4
        port = self._ports.get(family)
        now = self._reactor.seconds()
        if port is None or port.used >= QUERIES_PER_PORT and now - port.born >= MIN_PORT_LIFE:
            if port is not None:
                port.retire()
            port = self._ports[family] = _QueryPort(self, family, now)
        return port.query(*args)

    def close_ports(self):
        for port in self._ports.values():
            port.retire()
        self._ports.clear()


class _QueryPort:
    """One DNSDatagramProtocol on a random port, counting its queries."""

    def __init__(self, resolver, family, now):
        proto = dns.DNSDatagramProtocol(resolver, reactor=resolver._reactor)
        proto.noisy = False
        interface = "::" if family == 6 else ""
        for _ in range(100):
            try:
                resolver._reactor.listenUDP(dns.randomSource(), proto, interface=interface)
                break
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) == errno.EMFILE:
                    raise
        else:
            raise CannotListenError(interface, 0, "no free source port")
        self.proto = proto
        self.born = now
        self.used = 0
        self.in_flight = 0
        self.retired = False

    def query(self, *args):
        self.used += 1
        self.in_flight += 1
        d = self.proto.query(*args)

        def done(result):
            self.in_flight -= 1
            if self.retired and not self.in_flight:
                self._close()
            return result
        return d.addBoth(done)

    def retire(self):
        self.retired = True
        if not self.in_flight:
            self._close()

    def _close(self):
        transport = self.proto.transport
        if transport is not None:
            transport.stopListening()


class UpstreamResolver(common.ResolverBase):
    """The chain's last link: the upstream servers, with a hard deadline.

    ``resolver`` is any IResolver (tests pass a fake); by default a
    client.Resolver is made on first use (or at ``start()``) from
    ``servers`` or, if there are none, from ``resolv_conf``. Its records
    lose the AA bit and any OPT record: the proxy is not their authority.
    """

    log = Logger()

    def __init__(self, reactor, timeout, servers=(), resolv_conf="/etc/resolv.conf",
                 resolver=None):
        super().__init__()
        self._reactor = reactor
        self.timeout = timeout
        self.servers = [(str(host), port) for host, port in servers]
        self.resolv_conf = resolv_conf
        self._resolver = resolver
        self._owned = False

    @property
    def resolver(self):
        if self._resolver is None:
            kwargs = ({"servers": self.servers} if self.servers
                      else {"resolv": self.resolv_conf})
            # Retries end a little before the deadline, so that normally the
            # client gives up by itself (and cleans up) before it is cut off.
            self._resolver = PooledResolver(timeout=retry_schedule(self.timeout * 0.9),
                                            reactor=self._reactor, **kwargs)
            self._owned = True
        return self._resolver

    def stop(self):
        """Cancel the client's resolv.conf re-read timer and drop its TCP connections."""
        resolver, self._resolver = self._resolver, None
        if resolver is None or not self._owned:
            return
        call = getattr(resolver, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()
        if isinstance(resolver, PooledResolver):
            resolver.close_ports()
        for protocol in list(getattr(resolver, "connections", ())):
            if protocol.transport is not None:
                protocol.transport.loseConnection()

    def _lookup(self, name, cls, type, timeout):
        try:
            d = self.resolver.query(dns.Query(name, type, cls))
        except Exception:
            return defer.fail()
        d.addTimeout(self.timeout, self._reactor)
        d.addCallback(self._not_ours)
        return d

    @staticmethod
    def _not_ours(result):
        sections = []
        for section in result:
            records = [r for r in section if r.type != dns.OPT]
            for r in records:
                r.auth = False
            sections.append(records)
        return tuple(sections)


class _ReplyCatcher:
    """The tiny protocol handleQuery writes its response to."""

    def __init__(self):
        self.deferred = defer.Deferred()

    def writeMessage(self, message, address=None):
        if not self.deferred.called:
            self.deferred.callback(message)


class _DnsStreamProtocol(dns.DNSProtocol):
    """DNS over TCP (RFC 7766): length-prefixed queries, answered in any order."""

    def __init__(self, factory, reactor):
        super().__init__(factory, reactor=reactor)
        self.factory = factory
        self._pending = 0
        self._idle = None

    def connectionMade(self):
        super().connectionMade()
        self._arm()

    def _arm(self):
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._pending == 0 and self.transport is not None:
            self._idle = self._reactor.callLater(TCP_IDLE_TIMEOUT, self.transport.loseConnection)

    def stringReceived(self, data):
        self._pending += 1
        self._arm()
        self.factory.answer(data, stream=True).addCallback(self._reply)

    def _reply(self, wire):
        self._pending -= 1
        if self.transport is None or getattr(self.transport, "disconnected", False):
            return
        if wire is not None:
            self.sendString(wire)
        self._arm()

    def connectionLost(self, reason):
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        super().connectionLost(reason)


class DnsResolverProxy(server.DNSServerFactory):
    """Local names, then a cache, then upstream; see the module docstring.

    ``answer(payload, stream=False)`` is the sans-socket entry point: a
    Deferred that fires with the reply bytes, or None when the query is
    dropped (counted in ``drops``). The same object is the factory of the
    TCP listener. ``reactor`` (time, and for the default upstream UDP/TCP)
    is injectable; so is ``upstream``, any IResolver replacing the servers.
    """

    log = Logger()

    def __init__(self, config, reactor=None, upstream=None, resolv_conf="/etc/resolv.conf",
                 drops=None, counters=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.config = config
        self.drops = Counter() if drops is None else drops
        self.counters = Counter() if counters is None else counters
        self.local = LocalAuthority(config)
        self.answer_cache = BoundedCache(reactor)
        self.upstream = UpstreamResolver(reactor, config.dns_timeout,
                                         servers=config.dns_upstreams,
                                         resolv_conf=resolv_conf, resolver=upstream)
        super().__init__(authorities=[self.local], caches=[self.answer_cache],
                         clients=[self.upstream])
        self.noisy = False
        #: Largest UDP reply: what fits the link's MTU, at most MAX_EDNS_PAYLOAD
        #: (over IPv4; ``max_udp_payload6`` over IPv6's larger header).
        self.max_udp_payload = self._udp_limit(4)
        self.max_udp_payload6 = self._udp_limit(16)
        self.pending = 0

    # -- lifecycle

    def start(self):
        """Read the upstream configuration now rather than at the first query."""
        try:
            self.upstream.resolver
        except Exception:
            self.log.failure("DNS upstream configuration failed; local names only")

    def stop(self):
        self.upstream.stop()
        self.answer_cache.clear()
        for protocol in list(self.connections):
            if protocol.transport is not None:
                protocol.transport.abortConnection()

    def buildProtocol(self, addr):
        return _DnsStreamProtocol(self, self._reactor)

    def _udp_limit(self, address_len):
        return max(512, min(MAX_EDNS_PAYLOAD, self.config.mtu - _UDP_OVERHEAD[address_len]))

    # -- the entry point

    def answer(self, payload, stream=False, ipv6=False):
        """Answer one raw query; Deferred of the reply bytes, or None if dropped.
        ``ipv6``: it came over UDP/IPv6, whose replies fit a smaller payload."""
        try:
            message, edns = parse_query(payload)
        except MalformedQuery as e:
            self.drops[e.reason] += 1
            return defer.succeed(None)
        if self.pending >= MAX_PENDING:
            self.drops["dns-overload"] += 1
            return defer.succeed(None)
        self.counters["dns-queries"] += 1
        max_udp = self.max_udp_payload6 if ipv6 else self.max_udp_payload
        limit = MAX_STREAM_PAYLOAD if stream else (
            512 if edns is None else max(512, min(edns.udp_size, max_udp)))
        query = message.queries[0]
        message.timeReceived = self._reactor.seconds()
        catcher = _ReplyCatcher()
        if not valid_name(query.name.name):
            # Never forwarded; the reply carries no question (it could not be encoded).
            self.drops["dns-bad-name"] += 1
            message.queries = []
            catcher.writeMessage(self._responseFromMessage(message, rCode=dns.EFORMAT))
            return catcher.deferred.addCallback(self._finish, message, edns, limit, max_udp)
        if edns is not None and edns.version != 0:
            catcher.writeMessage(self._responseFromMessage(message, rCode=dns.OK))
            return catcher.deferred.addCallback(self._finish, message, edns, limit, max_udp,
                                                extended_rcode=_BADVERS >> 4)
        if message.opCode != dns.OP_QUERY:
            catcher.writeMessage(self._responseFromMessage(message, rCode=dns.ENOTIMP))
        elif query.cls not in (dns.IN, dns.ANY) or query.type in _ZONE_TRANSFER:
            catcher.writeMessage(self._responseFromMessage(message, rCode=dns.EREFUSED))
        else:
            self.pending += 1
            catcher.deferred.addBoth(self._done)
            try:
                d = self.handleQuery(message, catcher, None)
            except Exception:
                d = defer.fail()
            d.addErrback(self._internal_error, catcher, message)
        return catcher.deferred.addCallback(self._finish, message, edns, limit, max_udp)

    def _done(self, result):
        self.pending -= 1
        return result

    def _internal_error(self, failure, catcher, message):
        _limited_log.failure("DNS query failed", failure)
        self.drops["dns-internal-error"] += 1
        if not catcher.deferred.called:
            catcher.writeMessage(self._responseFromMessage(message, rCode=dns.ESERVER))

    def _finish(self, response, query, edns, limit, max_udp, extended_rcode=0):
        response.id = query.id
        response.opCode = query.opCode
        response.recDes = query.recDes
        response.checkingDisabled = query.checkingDisabled
        response.queries = query.queries[:]
        opt = None if edns is None else _OptRecord(max_udp, extended_rcode)
        try:
            wire, truncated = encode_reply(response, limit, opt)
        except Exception:
            _limited_log.failure("cannot encode a DNS reply")
            self.drops["dns-internal-error"] += 1
            response = self._responseFromMessage(query, rCode=dns.ESERVER)
            response.recDes = query.recDes
            wire, truncated = encode_reply(response, limit, opt)
        if truncated:
            self.counters["dns-truncated"] += 1
        rcode = _RCODE_NAMES.get(response.rCode, "other") if not extended_rcode else "badvers"
        self.counters[f"dns-{rcode}"] += 1
        return wire

    # -- twisted.names hooks

    def _responseFromMessage(self, message, rCode=dns.OK, answers=None, authority=None,
                             additional=None):
        response = super()._responseFromMessage(message, rCode, answers, authority, additional)
        # Also authoritative: local no-data (SOA in authority) and local NXDOMAIN.
        if any(r.isAuthoritative() for r in response.authority if hasattr(r, "isAuthoritative")):
            response.auth = 1
        return response

    def gotResolverError(self, failure, protocol, message, address):
        """Map the chain's failure to the rcode the guest should see.

        (DNSServerFactory maps every DomainError, upstream SERVFAIL and
        REFUSED included, to NXDOMAIN, and logs timeouts as errors.)
        """
        authority_records = []
        if failure.check(error.AuthoritativeDomainError):
            rcode = dns.ENAME
            authority_records = [dns.RRHeader(self.local.soa[0], dns.SOA, dns.IN, LOCAL_TTL,
                                              self.local.soa[1], auth=True)]
        elif failure.check(error.DNSNameError):
            rcode = dns.ENAME
            upstream = failure.value.args[0] if failure.value.args else None
            for r in getattr(upstream, "authority", ()):
                r.auth = False
                authority_records.append(r)
        elif failure.check(error.DNSQueryRefusedError):
            rcode = dns.EREFUSED
        elif failure.check(error.DNSNotImplementedError):
            rcode = dns.ENOTIMP
        elif failure.check(error.DomainError):
            rcode = dns.ESERVER
            self.counters["dns-upstream-error"] += 1
        elif failure.check(defer.TimeoutError, defer.CancelledError):
            rcode = dns.ESERVER
            self.counters["dns-upstream-timeout"] += 1
        elif failure.check(CannotListenError, OSError):
            # Out of file descriptors (or ports) for the upstream socket.
            rcode = dns.ESERVER
            self.drops["dns-upstream-no-socket"] += 1
            reason = failure.value
            reason = getattr(reason, "socketError", None) or reason
            _limited_log.warn("DNS: no upstream socket: {error}", error=str(reason))
        else:
            rcode = dns.ESERVER
            self.counters["dns-upstream-error"] += 1
            _limited_log.failure("DNS upstream lookup failed", failure)
        response = self._responseFromMessage(message=message, rCode=rcode,
                                             authority=authority_records)
        self.sendReply(protocol, response, address)


@implementer(IUDPService, IUDP6Service)
class DnsHandler:
    """DNS on port 53 of the stack's addresses, IPv4 and IPv6: UDP from the
    dispatcher, TCP through a 127.0.0.1 listener the TCP NAT splices guest
    connections of both families onto."""

    udp_port = 53
    local_only = True
    log = Logger()

    def __init__(self, dispatcher, config, egress=None, reactor=None, upstream=None,
                 resolv_conf="/etc/resolv.conf"):
        if reactor is None:
            from twisted.internet import reactor
        self.dispatcher = dispatcher
        self.config = config
        self.egress = egress
        self.reactor = reactor
        self.drops = Counter()
        self.counters = Counter()
        self.proxy = DnsResolverProxy(config, reactor=reactor, upstream=upstream,
                                      resolv_conf=resolv_conf, drops=self.drops,
                                      counters=self.counters)
        self.tcp_port = None
        self.running = True

    def start(self):
        self.running = True
        self.proxy.start()
        try:
            self.tcp_port = self.reactor.listenTCP(0, self.proxy, interface="127.0.0.1")
        except CannotListenError:
            self.log.failure("cannot listen for DNS over TCP; UDP only")
            return
        port = self.tcp_port.getHost().port
        if self.egress is not None:
            addresses = {self.config.gateway.packed, *self.dispatcher.owned}
            if self.config.ipv6:
                # fd00::1 (dns6 and the gateway) and fe80::1, as UDP is served.
                addresses |= {self.config.dns6.packed, *self.dispatcher.owned6}
            for address in sorted(addresses):
                self.egress.add_local_service(address, 53, "127.0.0.1", port)

    def stop(self):
        self.running = False
        port, self.tcp_port = self.tcp_port, None
        if port is not None:
            port.stopListening()
        self.proxy.stop()

    def handle_datagram(self, frame, ip, src_port, payload):
        if src_port == 0:
            self.drops["dns-source-port-0"] += 1
            return
        v6 = len(ip.src) == 16
        if v6 and not self.config.ipv6:
            self.drops["dns-ipv6-off"] += 1
            return
        d = self.proxy.answer(bytes(payload), ipv6=v6)
        d.addCallback(self._send, bytes(ip.dst), bytes(ip.src), src_port)
        d.addErrback(self._failed)

    def _send(self, wire, src, dst, port):
        if wire is None:
            return
        if not self.running:
            self.drops["dns-reply-after-stop"] += 1
            return
        self.dispatcher.framer.send_udp(src, dst, 53, port, wire)

    def _failed(self, failure):
        self.drops["dns-internal-error"] += 1
        _limited_log.failure("DNS reply failed", failure)
