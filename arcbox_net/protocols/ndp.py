"""Neighbor Discovery for the gateway (RFC 4861): the IPv6 side of ARP, plus
router advertisements, so a guest with ``accept_ra`` configures itself
(SLAAC address in the prefix, default route via ``fe80::1``, DNS from RDNSS
and DNSSL) with no client software at all.

Sans-I/O like arp.py: ``NdpResponder.handle`` takes one parsed ICMPv6
message and returns the messages to send; ``RouterAdvertiser.poll(now)``
returns the unsolicited RA when it is due and ``next_due`` says when to call
it again. Time is always passed in. ``NdpHandler`` is the thin adapter:
the framer out, the reactor's clock and one timer for the RA schedule.

Input is the guest's and untrusted: NDP messages must arrive with hop limit
255 (proof they were not routed: RFC 4861 6.1, 7.1), code 0, a valid
checksum and well-formed options, else they are counted in ``drops``.
RAs and redirects from the guest are counted and ignored: the stack is the
only router of the link.
"""

import ipaddress
import random
from collections import Counter, OrderedDict

import attrs

from ..wire import MalformedFrame, icmpv6, ipv6

#: RFC 4861 6.2.1 / 10 constants and defaults.
MAX_RTR_ADV_INTERVAL = 600.0
MIN_RTR_ADV_INTERVAL = 198.0          # 0.33 * MaxRtrAdvInterval
MAX_INITIAL_RTR_ADVERT_INTERVAL = 16.0
MAX_INITIAL_RTR_ADVERTISEMENTS = 3
MIN_DELAY_BETWEEN_RAS = 3.0
ROUTER_LIFETIME = 1800                # 3 * MaxRtrAdvInterval
VALID_LIFETIME = 2592000              # AdvValidLifetime: 30 days
PREFERRED_LIFETIME = 604800           # AdvPreferredLifetime: 7 days
HOP_LIMIT = 255
#: Guests whose last solicited RA time is remembered, at most (a flood of
#: made-up sources cannot grow the table).
SOLICITORS = 64


@attrs.frozen
class NdpReply:
    """An ICMPv6 message to send: Ethernet and IPv6 addresses, hop limit 255."""
    dst_mac: bytes
    src_ip: bytes
    dst_ip: bytes
    message: bytes
    hop_limit: int = HOP_LIMIT


def search_list(domain, search):
    """What DNSSL announces from StackConfig's names: the search list, or
    the domain when there is no list (as DHCPv4 hands out both)."""
    if search:
        return tuple(search)
    return (domain,) if domain else ()


class RouterAdvertiser:
    """RA content and schedule for the one link (RFC 4861 6.2)."""

    def __init__(self, mac, now, *, prefix=ipv6.DEFAULT_SUBNET, link_local=ipv6.ROUTER_LINK_LOCAL,
                 mtu=1500, managed=True, other=True, dns=(ipv6.DEFAULT_GATEWAY,), search=(),
                 router_lifetime=ROUTER_LIFETIME, valid_lifetime=VALID_LIFETIME,
                 preferred_lifetime=PREFERRED_LIFETIME, min_interval=MIN_RTR_ADV_INTERVAL,
                 max_interval=MAX_RTR_ADV_INTERVAL, rng=None):
        prefix = ipaddress.IPv6Network(prefix)
        if not 3 <= min_interval <= 0.75 * max_interval or not 4 <= max_interval <= 1800:
            raise ValueError(f"RA intervals {min_interval}..{max_interval} break RFC 4861 6.2.1")
        self.mac = mac
        self.source = ipv6.packed(link_local)
        if not ipv6.is_link_local(self.source):
            raise ValueError(f"{link_local} is not link-local: RAs must come from one")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.rng = rng or random.Random()
        # RDNSS/DNSSL lifetimes: at least 3 * MaxRtrAdvInterval (RFC 8106 5.1).
        dns_lifetime = int(3 * max_interval)
        self._fields = {
            "hop_limit": 64, "managed": managed, "other": other,
            "router_lifetime": router_lifetime, "source_mac": mac, "mtu": mtu,
            "prefixes": (icmpv6.PrefixInfo(prefix.network_address.packed, prefix.prefixlen,
                                           True, True, valid_lifetime, preferred_lifetime),),
            "rdnss": ((dns_lifetime, tuple(ipv6.packed(a) for a in dns)),) if dns else (),
            "dnssl": ((dns_lifetime, tuple(search)),) if search else (),
        }
        # Fail at construction, not at the first RA: bad names, too long a list.
        self.advertisement(ipv6.ALL_NODES)
        self.sent = 0                 # multicast RAs so far (the first few come faster)
        self.last_multicast = None
        self.next_due = now           # the first RA at once
        self._unicast = OrderedDict()  # solicitor address -> time of its last RA
        self.drops = Counter()

    def advertisement(self, dst, router_lifetime=None):
        fields = self._fields
        if router_lifetime is not None:
            fields = dict(fields, router_lifetime=router_lifetime)
        return icmpv6.router_advertisement(self.source, dst, **fields)

    def _interval(self):
        interval = self.rng.uniform(self.min_interval, self.max_interval)
        if self.sent <= MAX_INITIAL_RTR_ADVERTISEMENTS:
            interval = min(interval, MAX_INITIAL_RTR_ADVERT_INTERVAL)
        return interval

    def _multicast(self, now):
        self.sent += 1
        self.last_multicast = now
        self.next_due = now + self._interval()
        return NdpReply(ipv6.multicast_mac(ipv6.ALL_NODES), self.source, ipv6.ALL_NODES,
                        self.advertisement(ipv6.ALL_NODES))

    def poll(self, now):
        """[the unsolicited RA] when it is due, else []; then call again at
        ``next_due``."""
        if now < self.next_due:
            return []
        return [self._multicast(now)]

    def solicited(self, src_ip, src_mac, now):
        """The answer to a valid RS: unicast to a solicitor with an address
        (at most one per MIN_DELAY_BETWEEN_RAS each), else the multicast RA,
        at once unless one left within MIN_DELAY_BETWEEN_RAS; then it is
        brought forward to the earliest allowed time (RFC 4861 6.2.6)."""
        if ipv6.is_unspecified(src_ip) or src_mac is None:
            if self.last_multicast is not None \
                    and now - self.last_multicast < MIN_DELAY_BETWEEN_RAS:
                self.next_due = min(self.next_due, self.last_multicast + MIN_DELAY_BETWEEN_RAS)
                self.drops["ndp-rs-rate-limited"] += 1
                return []
            return [self._multicast(now)]
        last = self._unicast.get(src_ip)
        if last is not None and now - last < MIN_DELAY_BETWEEN_RAS:
            self.drops["ndp-rs-rate-limited"] += 1
            return []
        self._unicast.pop(src_ip, None)
        self._unicast[src_ip] = now
        if len(self._unicast) > SOLICITORS:
            self._unicast.popitem(last=False)
        return [NdpReply(src_mac, self.source, src_ip, self.advertisement(src_ip))]

    def final(self):
        """The RA to send when the stack stops: router lifetime 0, so guests
        drop the default route at once (RFC 4861 6.2.5)."""
        return NdpReply(ipv6.multicast_mac(ipv6.ALL_NODES), self.source, ipv6.ALL_NODES,
                        self.advertisement(ipv6.ALL_NODES, router_lifetime=0))


class NdpResponder:
    """Answers NS for the owned addresses and RS through ``advertiser``.

    ``handle(ip, message, src_mac, now) -> [NdpReply]``: ``ip`` the parsed
    ``ipv6.Ipv6Header``, ``message`` the ICMPv6 bytes, ``src_mac`` the
    frame's Ethernet source. ``learn(address, mac) -> bool`` (optional) is
    told the link-layer addresses guests announce, as ArpResponder's is.
    """

    def __init__(self, mac, advertiser, owned=(ipv6.ROUTER_LINK_LOCAL, ipv6.DEFAULT_GATEWAY),
                 learn=None):
        self.mac = mac
        self.advertiser = advertiser
        self.owned = {ipv6.packed(a) for a in owned}
        self.learn = learn
        self.drops = Counter()
        self.replies = 0

    def solicit(self, target):
        """The NS that resolves a guest address (the framer's unresolved-MAC
        path, as ARP requests are for IPv4): multicast to the target's
        solicited-node group, from the owned address of the same scope."""
        target = ipv6.packed(target)
        src = ipv6.ROUTER_LINK_LOCAL.packed if ipv6.is_link_local(target) else next(
            (a for a in sorted(self.owned) if not ipv6.is_link_local(a)),
            ipv6.ROUTER_LINK_LOCAL.packed)
        group = ipv6.solicited_node(target)
        return NdpReply(ipv6.multicast_mac(group), src, group,
                        icmpv6.neighbor_solicitation(src, group, target, self.mac))

    def handle(self, ip, message, src_mac, now):
        """Never raises on guest input."""
        message = bytes(message)
        if len(message) < 8:
            self.drops["ndp-malformed"] += 1
            return []
        kind = message[0]
        if kind not in (icmpv6.TYPE_ROUTER_SOLICIT, icmpv6.TYPE_ROUTER_ADVERT,
                        icmpv6.TYPE_NEIGHBOR_SOLICIT, icmpv6.TYPE_NEIGHBOR_ADVERT,
                        icmpv6.TYPE_REDIRECT):
            self.drops["ndp-not-ndp"] += 1
            return []
        if ip.hop_limit != HOP_LIMIT:
            self.drops["ndp-bad-hop-limit"] += 1
            return []
        if ipv6.is_multicast(ip.src):
            self.drops["ndp-multicast-source"] += 1
            return []
        if not icmpv6.verify(ip.src, ip.dst, message):
            self.drops["ndp-bad-checksum"] += 1
            return []
        try:
            if kind == icmpv6.TYPE_NEIGHBOR_SOLICIT:
                replies = self._solicitation(ip, icmpv6.parse_neighbor_solicitation(message),
                                             src_mac)
            elif kind == icmpv6.TYPE_ROUTER_SOLICIT:
                replies = self._router_solicitation(
                    ip, icmpv6.parse_router_solicitation(message), src_mac, now)
            elif kind == icmpv6.TYPE_NEIGHBOR_ADVERT:
                replies = self._advertisement(ip, icmpv6.parse_neighbor_advertisement(message),
                                              src_mac)
            else:
                # Another router on the link, or a guest pretending: ignored.
                icmpv6.parse_options(message[16 if kind == icmpv6.TYPE_ROUTER_ADVERT else 40:])
                self.drops["ndp-guest-router"] += 1
                replies = []
        except MalformedFrame as exc:
            self.drops["ndp-malformed" if exc.reason.startswith("ndp-short") else exc.reason] += 1
            return []
        self.replies += len(replies)
        return replies

    def _solicitation(self, ip, ns, src_mac):
        """RFC 4861 7.1.1 checks, then 7.2.4's answer."""
        if ipv6.is_multicast(ns.target):
            self.drops["ndp-multicast-target"] += 1
            return []
        dad = ipv6.is_unspecified(ip.src)
        if dad and (ip.dst != ipv6.solicited_node(ns.target) or ns.source_mac is not None):
            self.drops["ndp-bad-dad"] += 1
            return []
        if ns.target not in self.owned:
            self.drops["ndp-not-ours"] += 1
            return []
        if dad:
            # Someone probes for our address: defend it to all nodes, unsolicited.
            return [NdpReply(ipv6.multicast_mac(ipv6.ALL_NODES), ns.target, ipv6.ALL_NODES,
                             icmpv6.neighbor_advertisement(ns.target, ipv6.ALL_NODES, ns.target,
                                                           self.mac, router=True))]
        mac = ns.source_mac or src_mac
        if ns.source_mac is not None:
            self._learn(ip.src, ns.source_mac, src_mac)
        return [NdpReply(mac, ns.target, ip.src,
                         icmpv6.neighbor_advertisement(ns.target, ip.src, ns.target, self.mac,
                                                       router=True, solicited=True))]

    def _router_solicitation(self, ip, rs, src_mac, now):
        """RFC 4861 6.1.1: no source link-layer option from the unspecified address."""
        if ipv6.is_unspecified(ip.src):
            if rs.source_mac is not None:
                self.drops["ndp-bad-rs"] += 1
                return []
            return self.advertiser.solicited(ip.src, None, now)
        if rs.source_mac is not None:
            self._learn(ip.src, rs.source_mac, src_mac)
        # Rate-limited answers are counted in the advertiser's drops.
        return self.advertiser.solicited(ip.src, rs.source_mac or src_mac, now)

    def _advertisement(self, ip, na, src_mac):
        """RFC 4861 7.1.2: a solicited NA to a multicast address is invalid."""
        if ipv6.is_multicast(na.target) or (na.solicited and ipv6.is_multicast(ip.dst)):
            self.drops["ndp-bad-na"] += 1
            return []
        if na.target in self.owned:
            self.drops["ndp-address-conflict"] += 1
            return []
        if na.target_mac is not None:
            self._learn(na.target, na.target_mac, src_mac)
        return []

    def _learn(self, address, announced_mac, src_mac):
        if self.learn is None or ipv6.is_unspecified(address):
            return
        if announced_mac != src_mac or not self.learn(address, announced_mac):
            self.drops["ndp-spoofed-sender"] += 1


class NdpHandler:
    """Connects the NDP cores to the dispatcher and the reactor: NDP
    messages in (from the ICMPv6 handler), replies out through the framer,
    unsolicited RAs on the advertiser's schedule (one timer), and the final
    RA (router lifetime 0) when the stack stops. Not a dispatch handler of
    its own: ICMPv6 is one IP protocol, so protocols/icmpv6.py hands it the
    NDP types."""

    def __init__(self, dispatcher, config, reactor):
        self.framer = dispatcher.framer
        self.reactor = reactor
        mtu = min(config.mtu, self.framer.mtu)
        self.advertiser = RouterAdvertiser(
            config.gateway_mac, reactor.seconds(), prefix=config.ipv6_subnet,
            link_local=config.router_link_local, mtu=mtu, dns=(config.dns6,),
            search=search_list(config.domain, config.search))
        self.core = NdpResponder(config.gateway_mac, self.advertiser,
                                 owned=sorted(config.owned_addresses6),
                                 learn=self.framer.learn_claim)
        self._timer = None
        self._stopped = False

    @property
    def drops(self):
        return self.core.drops + self.advertiser.drops

    def start(self):
        self._stopped = False
        self._schedule()

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._send([self.advertiser.final()])

    def _schedule(self):
        delay = max(0.0, self.advertiser.next_due - self.reactor.seconds())
        self._timer = self.reactor.callLater(delay, self._due)

    def _due(self):
        self._timer = None
        self._send(self.advertiser.poll(self.reactor.seconds()))
        self._schedule()

    def handle_ipv6(self, frame, ip):
        replies = self.core.handle(ip, ip.payload(frame), frame[6:12], self.reactor.seconds())
        self._send(replies)
        if self._timer is not None and self._timer.active() and \
                self._timer.getTime() > self.advertiser.next_due:
            # A solicitation brought the next multicast RA forward.
            self._timer.cancel()
            self._schedule()

    def _send(self, replies):
        for reply in replies:
            self.framer.send_ip(reply.src_ip, reply.dst_ip, icmpv6.NH_ICMPV6, reply.message,
                                ttl=reply.hop_limit, dst_mac=bytes(reply.dst_mac))
