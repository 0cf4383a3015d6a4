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

IPv6 is the same decision with 16-byte addresses: the IPv6 gateway
(fd00::1) reaches the host's ``::1`` (127.0.0.1 on a host without an IPv6
loopback), ``::1``/``::`` and link-local destinations are martians, and the
rules of both families sit in one policy (an address only ever matches a
network of its own family).
"""

import ipaddress

import attrs

from .wire import icmp

import socket

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
LOOPBACK6 = ipaddress.IPv6Address("::1")
DEFAULT_DENY = (ipaddress.IPv4Network("169.254.0.0/16"),)
_V6_LOCAL = {bytes(16), LOOPBACK6.packed}


def is_host_local(address):
    """127.0.0.0/8 or 0.0.0.0/8 (which reaches the host's own sockets too),
    ``::1`` or ``::``; an IPv4-mapped IPv6 address of those too."""
    if not isinstance(address, bytes):
        address = address.packed
    if len(address) == 16:
        if address[:12] == b"\0" * 10 + b"\xff\xff":
            address = address[12:]
        else:
            return address in _V6_LOCAL
    return address[0] == 127 or address[0] == 0


def _martian6(dst):
    """Guest IPv6 destinations that are never routed: the host's own
    (``::``, ``::1``, IPv4-mapped), link-local and multicast."""
    return dst in _V6_LOCAL or dst[0] == 0xFF or dst[:2] == b"\xfe\x80" \
        or dst[:12] == b"\0" * 10 + b"\xff\xff"


def host_has_ipv6_loopback():
    """Can this host bind ``::1``? (A host booted with ipv6.disable=1 cannot.)"""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


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
            address = ipaddress.ip_address(address)
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

    def __init__(self, config, ipv6_loopback=None):
        self.gateway = config.gateway.packed
        self.gateway6 = config.gateway6.packed
        self.host_loopback = config.host_loopback
        if ipv6_loopback is None:
            ipv6_loopback = host_has_ipv6_loopback() if config.ipv6 else False
        #: Where the IPv6 gateway leads on the host: ::1, or 127.0.0.1 without it.
        self.loopback6 = LOOPBACK6 if ipv6_loopback else LOOPBACK
        self.mapping = {virtual.packed: host for virtual, host in config.address_map}
        #: The guest's own networks: no destination in them leads to the host
        #: (the DNS address's other ports, a neighbour guest, the broadcast).
        self._guest_nets = (config.subnet, config.ipv6_subnet)
        self.policy = EgressPolicy(allow=config.allow, deny=config.deny)
        #: (guest-visible address bytes, port) -> (host, port) of a service the
        #: stack runs itself on the host (e.g. DNS over TCP on the gateway).
        self.local_services = {}

    def add_local_service(self, address, port, host, host_port):
        """Send TCP/UDP for ``address``:``port`` to ``host``:``host_port`` instead."""
        self.local_services[(address, port)] = (host, host_port)

    def host_address(self, dst):
        """The host address for guest destination ``dst`` (4 or 16 bytes), ignoring policy.

        None when there is no host address for it (the gateway without
        host loopback).
        """
        host = self.mapping.get(dst)
        if host is not None:
            return host
        if dst == self.gateway:
            return LOOPBACK if self.host_loopback else None
        if dst == self.gateway6:
            return self.loopback6 if self.host_loopback else None
        return ipaddress.ip_address(dst)

    def route(self, dst, port=0):
        """Where guest traffic to ``dst`` (4 or 16 bytes) and ``port`` goes: a
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
        elif len(dst) == 4:
            if dst == self.gateway:
                if not self.host_loopback:
                    return NO_ROUTE
                host = LOOPBACK
            elif dst[0] == 127 or dst[0] == 0:
                return MARTIAN
            else:
                host = ipaddress.IPv4Address(dst)
                if host in self._guest_nets[0]:
                    return NO_ROUTE
        elif dst == self.gateway6:
            if not self.host_loopback:
                return NO_ROUTE
            host = self.loopback6
        elif _martian6(dst):
            return MARTIAN
        else:
            host = ipaddress.IPv6Address(dst)
            if host in self._guest_nets[1]:
                return NO_ROUTE
        if not self.policy.allows(host):
            return DENIED
        return str(host), port
