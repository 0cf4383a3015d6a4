"""The neighbour table: which MAC owns which guest address (sans-I/O).

A router sends each packet to the MAC that owns its destination address, not
to "the" guest: a VM may carry a bridge or containers with MACs of their own,
and a spoofer's frame must not redirect another address's traffic. Entries
are learned only where the stack can vouch for them:

- a DHCP lease binds its address to its MAC until the lease expires, and a
  static lease (``--static-lease``) binds for good;
- the configured guest address (``StackConfig.guest``, what ``--configure``
  gives a TAP without DHCP) is claimed by the first MAC that uses it while no
  lease binds it, and stays claimed while that MAC keeps using it;
- an ARP request or reply, or an IPv4 frame, confirms an entry only when its
  sender address is one of those for its MAC (``valid_source``).

The same rule validates every guest frame's source address: a frame whose
source is not its MAC's is dropped by the dispatcher (and counted), so it is
neither NATed nor learned. ``allow_any_source`` turns the check off: then any
address inside or outside the subnet is learned from whichever MAC last used
it, as the old single-MAC stack behaved.

IPv6 addresses (16 bytes) share the table. A guest picks its own (SLAAC,
privacy and link-local addresses), so any address in the IPv6 prefix or
fe80::/64 is claimable by the first MAC that uses it and stays that MAC's
while it keeps using it; a DHCPv6 binding binds its address like a lease.

``macs`` (address bytes -> MAC bytes) is the framer's one lookup per packet;
it is never rebound. Entries age: one not confirmed for ``ttl`` seconds is
forgotten (the next packet to it asks by ARP), and there are at most
``max_entries`` (the least recently confirmed goes first).
"""

import math
from collections import Counter

#: Seconds an entry lives without being confirmed by a frame from its owner.
TTL = 300.0
#: Entries at most (a /16 of busy guests is far beyond any real link).
MAX_ENTRIES = 4096
_ZERO = b"\x00\x00\x00\x00"
_ZERO6 = bytes(16)
_LINK_LOCAL_PREFIX = b"\xfe\x80" + bytes(6)


class NeighbourTable:
    def __init__(self, config, ttl=TTL, max_entries=MAX_ENTRIES):
        net = config.subnet
        self._net = int(net.network_address)
        self._mask = int(net.netmask)
        self._not_guests = {a.packed for a in (net.network_address, net.broadcast_address,
                                               config.gateway, config.dns_server)}
        self.allow_any_source = getattr(config, "allow_any_source", False)
        self.ttl = ttl
        self.max_entries = max_entries
        #: address -> MAC: where packets to that address go (the hot path).
        self.macs = {}
        #: address -> last time a frame from its owner confirmed it.
        self.seen = {}
        #: address -> (MAC, until): bound by a DHCP lease or a static lease.
        self._owner = {}
        self._claimable = {config.guest.packed}
        net6 = getattr(config, "ipv6_subnet", None)
        if net6 is not None:
            self._net6 = int(net6.network_address)
            self._mask6 = int(net6.netmask)
            self._not_guests |= {net6.network_address.packed,
                                 *(a.packed for a in config.owned_addresses6)}
        else:
            self._net6 = self._mask6 = -1
        for mac, address in config.static_leases:
            self._owner[address.packed] = (bytes(mac), math.inf)
        self.counters = Counter()
        #: The MAC most recently learned (what older callers call the guest's MAC).
        self.last_mac = None

    # -- what the stack vouches for

    def bind(self, address, mac, until):
        """A lease binds ``address`` (4 bytes) to ``mac`` until ``until``."""
        address, mac = bytes(address), bytes(mac)
        self._owner[address] = (mac, until)
        if self.macs.get(address, mac) != mac:
            self.counters["neighbour-rebound"] += 1
            self.forget(address)

    def unbind(self, address, mac):
        """The lease of ``address`` held by ``mac`` ended (released, declined, expired)."""
        address = bytes(address)
        owner = self._owner.get(address)
        if owner is not None and owner[0] == mac and owner[1] != math.inf:
            del self._owner[address]
            if self.macs.get(address) == mac and address not in self._claimable:
                self.forget(address)

    def bindings(self, now):
        """[(address, MAC, seconds left)] of every DHCP lease binding (what a
        queue worker process is told, as its own table has no DHCP)."""
        return [(a, m, u - now) for a, (m, u) in self._owner.items() if u != math.inf]

    def replace_bindings(self, bindings, now):
        """Take the lease bindings another process's table reported."""
        for address in [a for a, (_, u) in self._owner.items() if u != math.inf]:
            del self._owner[address]
        for address, mac, left in bindings:
            self.bind(address, mac, now + left)

    def in_subnet(self, address):
        """Is ``address`` a guest's: in the IPv4 subnet, or in the IPv6 prefix
        or link-local?"""
        if len(address) == 4:
            return int.from_bytes(address, "big") & self._mask == self._net
        if len(address) != 16:
            return False
        if address[:8] == _LINK_LOCAL_PREFIX:
            return True
        return int.from_bytes(address, "big") & self._mask6 == self._net6

    def valid_source(self, address, mac, now):
        """May a frame from ``mac`` carry source ``address`` (4 or 16 bytes)?"""
        if self.allow_any_source:
            return address != _ZERO and address not in self._not_guests \
                and not (len(address) == 16 and (address[0] == 0xFF or address == _ZERO6))
        if address in self._not_guests or not self.in_subnet(address):
            return False
        owner = self._owner.get(address)
        if owner is not None:
            if owner[1] > now:
                return owner[0] == mac
            del self._owner[address]           # the lease lapsed
        if address in self._claimable or len(address) == 16:
            current = self.macs.get(address)
            return current is None or current == mac
        return False

    # -- the table

    def confirm(self, address, mac, now):
        """Record that ``mac`` owns ``address`` now (the caller validated it);
        True if this is new (packets waiting for it may go)."""
        address, mac = bytes(address), bytes(mac)
        old = self.macs.get(address)
        self.seen[address] = now
        if old == mac:
            return False
        if old is None and len(self.macs) >= self.max_entries:
            self.expire(now)
            if len(self.macs) >= self.max_entries:
                stalest = min(self.seen, key=self.seen.get)
                self.forget(stalest)
                self.counters["neighbour-evicted"] += 1
        if old is not None:
            self.counters["neighbour-moved"] += 1
        self.macs[address] = mac
        self.last_mac = mac
        self.counters["neighbour-learned"] += 1
        return True

    def forget(self, address):
        self.macs.pop(address, None)
        self.seen.pop(address, None)

    def expire(self, now):
        """Forget entries not confirmed for ``ttl`` seconds, and lapsed leases."""
        limit = now - self.ttl
        for address in [a for a, t in self.seen.items() if t < limit]:
            self.forget(address)
            self.counters["neighbour-expired"] += 1
        for address in [a for a, (_, until) in self._owner.items() if until <= now]:
            del self._owner[address]

    def entries(self):
        """[(address, MAC)] in the table now."""
        return list(self.macs.items())
