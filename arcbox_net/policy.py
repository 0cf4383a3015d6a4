"""Where guest traffic may go: address mapping and the egress policy.

Shared by the TCP, UDP and ICMP NAT: ``Egress.route(dst, port)`` is the one
decision "send this to that host address and port, or refuse it, and with
which ICMP error a router would answer". The policy is applied to the host
address (after mapping): that is the address traffic really reaches, so
``--deny 0.0.0.0/0 --allow 127.0.0.0/8`` keeps every packet on this machine
whatever the guest tries.

Host loopback is reached only through names for it: the gateway address
(unless ``--no-host-loopback``) and ``--map`` targets. A guest addressing
127.0.0.0/8 or 0.0.0.0/8 itself is a martian, dropped and counted as a
kernel router would (``MARTIAN``); with ``--no-host-loopback`` no guest
packet reaches those host addresses at all, mapped or not (``LOOPBACK_CLOSED``).
Services the stack runs itself (``add_local_service``: DNS over TCP) are
the stack, not the host, and stay reachable.
"""

import ipaddress

import attrs

from .wire import icmp

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
DEFAULT_DENY = (ipaddress.IPv4Network("169.254.0.0/16"),)


def is_host_local(address):
    """127.0.0.0/8 or 0.0.0.0/8 (which reaches the host's own sockets too)."""
    first = address.packed[0] if isinstance(address, ipaddress.IPv4Address) else address[0]
    return first == 127 or first == 0


class EgressPolicy:
    """Allow/deny rules by CIDR; the most specific rule wins, default allow."""

    def __init__(self, allow=(), deny=DEFAULT_DENY):
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        rules = [(net, True) for net in self.allow] + [(net, False) for net in self.deny]
        # Longest prefix first; at equal length an explicit allow beats deny.
        rules.sort(key=lambda r: (r[0].prefixlen, r[1]), reverse=True)
        self._rules = tuple(rules)
        self._cache = {}

    def allows(self, address):
        if isinstance(address, bytes):
            address = ipaddress.IPv4Address(address)
        cached = self._cache.get(address)
        if cached is not None:
            return cached
        verdict = True
        for net, allowed in self._rules:
            if address in net:
                verdict = allowed
                break
        if len(self._cache) < 65536:
            self._cache[address] = verdict
        return verdict


@attrs.frozen
class Refusal:
    """Why guest traffic goes nowhere: ``reason`` names the drop counter
    (``tcp-denied``, ``udp-no-route``, ...), ``icmp_code`` is the
    destination-unreachable code the guest is told."""

    reason: str
    icmp_code: int


#: The policy forbids the host address.
DENIED = Refusal("denied", icmp.CODE_ADMIN_PROHIBITED)
#: No host address exists for it (the gateway without host loopback).
NO_ROUTE = Refusal("no-route", icmp.CODE_NET_UNREACH)
#: The guest addressed 127.0.0.0/8 or 0.0.0.0/8 itself: never a destination.
MARTIAN = Refusal("martian", icmp.CODE_NET_UNREACH)
#: A mapped address leads to host loopback, and --no-host-loopback closed it.
LOOPBACK_CLOSED = Refusal("loopback-closed", icmp.CODE_ADMIN_PROHIBITED)


class Egress:
    """Maps guest-visible destinations to host addresses and applies the policy."""

    def __init__(self, config):
        self.gateway = config.gateway.packed
        self.host_loopback = config.host_loopback
        self.mapping = {virtual.packed: host for virtual, host in config.address_map}
        self.policy = EgressPolicy(allow=config.allow, deny=config.deny)
        #: (guest-visible address bytes, port) -> (host, port) of a service the
        #: stack runs itself on the host (e.g. DNS over TCP on the gateway).
        self.local_services = {}

    def add_local_service(self, address, port, host, host_port):
        """Send TCP/UDP for ``address``:``port`` to ``host``:``host_port`` instead."""
        self.local_services[(address, port)] = (host, host_port)

    def host_address(self, dst):
        """The host address for guest destination ``dst`` (4 bytes), ignoring policy.

        None when there is no host address for it (the gateway without
        host loopback).
        """
        host = self.mapping.get(dst)
        if host is not None:
            return host
        if dst == self.gateway:
            return LOOPBACK if self.host_loopback else None
        return ipaddress.IPv4Address(dst)

    def route(self, dst, port=0):
        """Where guest traffic to ``dst`` (4 bytes) and ``port`` goes: a
        (host address string, port) target, or a Refusal. A local service the
        stack runs itself wins over mapping and policy (pass the port for TCP
        and UDP; ICMP has none)."""
        if port:
            service = self.local_services.get((dst, port))
            if service is not None:
                return service
        host = self.mapping.get(dst)
        if host is not None:
            if not self.host_loopback and is_host_local(host):
                return LOOPBACK_CLOSED
        elif dst == self.gateway:
            if not self.host_loopback:
                return NO_ROUTE
            host = LOOPBACK
        elif dst[0] == 127 or dst[0] == 0:
            return MARTIAN
        else:
            host = ipaddress.IPv4Address(dst)
        if not self.policy.allows(host):
            return DENIED
        return str(host), port
