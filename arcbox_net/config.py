"""The stack's configuration: one validated attrs value for the CLI and the API."""

import ipaddress

import attrs

from .wire.ethernet import is_unicast, mac_from_str, mac_to_str


class ConfigError(ValueError):
    """An invalid setting; the message is meant for the user as is."""


def _network(value):
    if isinstance(value, ipaddress.IPv4Network):
        return value
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise ConfigError(f"subnet {value!r} is not an IPv4 network: {e}") from None


def _address(value):
    if isinstance(value, ipaddress.IPv4Address):
        return value
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError(f"{value!r} is not an IPv4 address") from None


def _ip_address(value, what="address"):
    """An IPv4 or IPv6 address, either family (maps, records, forwards); an
    IPv6 one may come in brackets, as in ``[::1]:8080``."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    text = value[1:-1] if isinstance(value, str) and value.startswith("[") \
        and value.endswith("]") else value
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not an IP address") from None


def _network6(value):
    if isinstance(value, ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.IPv6Network(value, strict=True)
    except ValueError as e:
        raise ConfigError(f"IPv6 subnet {value!r} is not an IPv6 network: {e}") from None


def _optional_address6(value):
    if value is None or isinstance(value, ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.IPv6Address(value)
    except ValueError:
        raise ConfigError(f"{value!r} is not an IPv6 address") from None


def _optional_address(value):
    return None if value is None else _address(value)


def _mac(value):
    if isinstance(value, bytes) and len(value) == 6:
        return value
    try:
        return mac_from_str(value)
    except (ValueError, AttributeError, TypeError):
        raise ConfigError(f"{value!r} is not a MAC address") from None


def _static_leases(value):
    """Accept {mac: ip} or [(mac, ip)] in any spelling; keep a tuple of pairs.
    A MAC may have one IPv4 and one IPv6 (DHCPv6) static address."""
    items = value.items() if isinstance(value, dict) else value
    return tuple((_mac(mac), _ip_address(ip)) for mac, ip in items)


def _networks(value):
    if isinstance(value, str):
        value = [value]
    out = []
    for v in value:
        try:
            out.append(v if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                       else ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ConfigError(f"{v!r} is not an IPv4 or IPv6 CIDR") from None
    return tuple(out)


def _address_map(value):
    """Accept {virtual: host} or [(virtual, host)] or ["V=H"]; keep pairs."""
    items = value.items() if isinstance(value, dict) else value
    out = []
    for item in items:
        if isinstance(item, str):
            virtual, sep, host = item.partition("=")
            if not sep:
                raise ConfigError(f"map {item!r} is not VIRTUAL=HOST")
            item = (virtual, host)
        virtual, host = _ip_address(item[0]), _ip_address(item[1])
        if virtual.version != host.version:
            raise ConfigError(f"map {virtual}={host} mixes IPv4 and IPv6")
        out.append((virtual, host))
    return tuple(out)


def _host_port(text, default_port, message):
    """"ADDR", "ADDR:PORT", "[V6]", "[V6]:PORT" or a bare IPv6 address."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or rest and not rest.startswith(":"):
            raise ConfigError(message)
        port = rest[1:] if rest else None
    elif text.count(":") > 1:
        host, port = text, None
    else:
        host, sep, port = text.partition(":")
        port = port if sep else None
    try:
        return host, int(port) if port is not None else default_port
    except ValueError:
        raise ConfigError(message) from None


def _upstreams(value):
    """DNS upstreams as (IPv4Address, port); accepts "ADDR", "ADDR:PORT" or pairs."""
    if isinstance(value, str):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, str):
            host, port = _host_port(item, 53, f"DNS upstream {item!r} is not ADDR[:PORT]")
            item = (host, port)
        host, port = item
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"DNS upstream port {port!r} is out of range")
        out.append((_ip_address(host), port))
    return tuple(out)


def _records(value):
    """Local DNS records as (name, address): an IPv4 address answers A, an
    IPv6 one AAAA; accepts "NAME=ADDR" or pairs."""
    items = value.items() if isinstance(value, dict) else value
    out = []
    for item in items:
        if isinstance(item, str):
            name, sep, addr = item.partition("=")
            if not sep:
                raise ConfigError(f"DNS record {item!r} is not NAME=ADDR")
            item = (name, addr)
        name, addr = item
        name = name.strip().rstrip(".").lower()
        if not name or len(name) > 253 or " " in name:
            raise ConfigError(f"{name!r} is not a DNS name")
        out.append((name, _ip_address(addr)))
    return tuple(out)


def _forwards(value):
    if isinstance(value, (str, ForwardSpec)):
        value = [value]
    return tuple(v if isinstance(v, ForwardSpec) else ForwardSpec.parse(v) for v in value)


def _names(value):
    if isinstance(value, str):
        value = [value]
    return tuple(v.strip(".") for v in value if v)


MIN_MTU = 576
MAX_MTU = 65520


FORWARD_PROTOCOLS = ("tcp", "udp")


def _port(text, what, lowest=1):
    """A port: a JSON integer or plain ASCII decimal digits (int() would also
    take " 80", "+80", "8_0" and non-ASCII digits)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)) or \
            isinstance(text, str) and not (text.isascii() and text.isdigit() and len(text) <= 5):
        raise ConfigError(f"{what} {text!r} is not a port number")
    port = int(text)
    if not lowest <= port < 65536:
        raise ConfigError(f"{what} {port} is out of range {lowest}..65535")
    return port


def _looks_like_address(text):
    return "." in text or text.startswith("[")


def _fields(text):
    """Split on colons outside brackets: "[::1]:80" is two fields."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == ":" and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


@attrs.frozen
class ForwardSpec:
    """PROTO:[BIND_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT as a value; IPv6
    addresses in brackets (``tcp:[::1]:8080:[fd00::2]:80``)."""

    protocol: str
    host_port: int
    guest_port: int
    bind: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address("127.0.0.1")
    #: None means the leased guest address.
    guest: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    @classmethod
    def parse(cls, text):
        parts = _fields(text.strip())
        if len(parts) < 3:
            raise ConfigError(f"forward {text!r} is not PROTO:[BIND_ADDR:]HOST_PORT:GUEST_PORT")
        protocol, rest = parts[0].lower(), parts[1:]
        if protocol not in FORWARD_PROTOCOLS:
            raise ConfigError(f"forward {text!r}: protocol must be tcp or udp")
        bind = "127.0.0.1"
        guest = None
        if len(rest) == 4:
            bind, host_port, guest, guest_port = rest
        elif len(rest) == 3:
            if _looks_like_address(rest[0]):
                bind, host_port, guest_port = rest
            else:
                host_port, guest, guest_port = rest
        elif len(rest) == 2:
            host_port, guest_port = rest
        else:
            raise ConfigError(f"forward {text!r} is not PROTO:[BIND_ADDR:]HOST_PORT:GUEST_PORT")
        return cls(protocol=protocol, host_port=_port(host_port, "host port", lowest=0),
                   guest_port=_port(guest_port, "guest port"), bind=_ip_address(bind, "bind address"),
                   guest=None if guest is None else _ip_address(guest, "guest address"))

    @classmethod
    def from_json(cls, data):
        """The API's form: {"protocol", "listen": "ADDR:PORT", "guest": "[ADDR:]PORT"}."""
        if not isinstance(data, dict):
            raise ConfigError("a forward is a JSON object")
        unknown = set(data) - {"protocol", "listen", "guest"}
        if unknown:
            raise ConfigError(f"unknown field(s): {', '.join(sorted(unknown))}")
        missing = {"protocol", "listen", "guest"} - set(data)
        if missing:
            raise ConfigError(f"missing field(s): {', '.join(sorted(missing))}")
        protocol, listen, guest = data["protocol"], data["listen"], data["guest"]
        if not all(isinstance(v, (str, int)) for v in (protocol, listen, guest)) \
                or isinstance(protocol, int):
            raise ConfigError("protocol, listen and guest are strings")
        protocol = protocol.lower()
        if protocol not in FORWARD_PROTOCOLS:
            raise ConfigError("protocol must be tcp or udp")
        listen = str(listen)
        bind, sep, host_port = listen.rpartition(":")
        if not sep or bind.count(":") and not bind.startswith("["):
            bind, host_port = "127.0.0.1", listen
        guest = str(guest)
        guest_addr, sep, guest_port = guest.rpartition(":")
        return cls(protocol=protocol, host_port=_port(host_port, "listen port", lowest=0),
                   guest_port=_port(guest_port, "guest port"), bind=_ip_address(bind, "listen address"),
                   guest=_ip_address(guest_addr, "guest address") if sep else None)

    def check_guest(self, config):
        """Refuse a guest address that is not a guest's in ``config``'s subnet
        (outside it, or its network, broadcast, gateway or DNS address)."""
        guest = self.guest
        if guest is None:
            return
        if guest.version == 6:
            net = config.ipv6_subnet
            not_guests = (net.network_address, config.gateway6, config.dns6)
        else:
            net = config.subnet
            not_guests = (net.network_address, net.broadcast_address, config.gateway,
                          config.dns_server)
        if guest not in net or guest in not_guests:
            raise ConfigError(f"forward guest address {guest} is not a guest address of {net}")

    def __str__(self):
        guest = f"{_bracket(self.guest)}:{self.guest_port}" if self.guest else str(self.guest_port)
        return f"{self.protocol}:{_bracket(self.bind)}:{self.host_port}:{guest}"


def _bracket(address):
    return f"[{address}]" if address.version == 6 else str(address)


@attrs.frozen(kw_only=True)
class StackConfig:
    """Addresses and limits of the guest network.

    Defaults follow arcbox-net's convention: 10.0.2.0/24, gateway (and DNS)
    10.0.2.1, first guest 10.0.2.2.
    """

    subnet: ipaddress.IPv4Network = attrs.field(
        default="10.0.2.0/24", converter=_network)
    gateway: ipaddress.IPv4Address = attrs.field(default="10.0.2.1", converter=_address)
    guest: ipaddress.IPv4Address = attrs.field(default="10.0.2.2", converter=_address)
    #: The DNS server announced by DHCP; None means the gateway.
    dns: ipaddress.IPv4Address | None = attrs.field(default=None, converter=_optional_address)
    mtu: int = attrs.field(default=1500)
    domain: str | None = attrs.field(default=None)
    search: tuple = attrs.field(default=(), converter=_names)
    lease_time: int = attrs.field(default=3600)
    gateway_mac: bytes = attrs.field(default="02:ab:cb:00:00:01", converter=_mac)
    static_leases: tuple = attrs.field(default=(), converter=_static_leases)
    #: TCP/UDP/ICMP to the gateway address reach the host's 127.0.0.1.
    host_loopback: bool = attrs.field(default=True)
    #: Take guest frames from any source address, not only the one leased or
    #: configured for the sending MAC (neighbours.py).
    allow_any_source: bool = attrs.field(default=False)
    #: (guest-visible address, host address) pairs, e.g. 203.0.113.10 -> 127.0.0.2.
    address_map: tuple = attrs.field(default=(), converter=_address_map)
    #: Egress policy: CIDRs the guest may / may not reach (most specific wins).
    allow: tuple = attrs.field(default=(), converter=_networks)
    deny: tuple = attrs.field(default=("169.254.0.0/16",), converter=_networks)
    #: Seconds a guest SYN waits for the host connect before ICMP host unreachable.
    connect_timeout: float = attrs.field(default=10.0)
    #: Concurrent TCP connections; beyond it a SYN gets RST (counted).
    max_connections: int = attrs.field(default=4096)
    #: Guest TCP connections still opening (host connect pending or SYN-ACK
    #: unanswered) at once; beyond it a SYN gets RST (counted), so a SYN
    #: flood cannot open thousands of host sockets.
    max_half_open: int = attrs.field(default=256)
    #: Seconds a TCP connection may stay in FIN_WAIT_2 without guest data
    #: (Linux's tcp_fin_timeout), and in CLOSE_WAIT without host data.
    tcp_fin_timeout: float = attrs.field(default=60.0)
    tcp_close_wait_timeout: float = attrs.field(default=300.0)
    #: Offer and accept TCP timestamps (RFC 7323) with the guest.
    tcp_timestamps: bool = attrs.field(default=True)
    #: UDP flow idle timeout (seconds), and the longer one once replies came back.
    udp_timeout: float = attrs.field(default=60.0)
    udp_established_timeout: float = attrs.field(default=180.0)
    #: UDP flows at once; beyond it the oldest idle flow is evicted (counted).
    max_udp_flows: int = attrs.field(default=1024)
    #: DNS upstreams as (address, port); empty means the host's /etc/resolv.conf.
    dns_upstreams: tuple = attrs.field(default=(), converter=_upstreams)
    #: Extra local DNS names (name, address), answered before any upstream.
    dns_records: tuple = attrs.field(default=(), converter=_records)
    #: Seconds before an unanswered upstream query becomes SERVFAIL.
    dns_timeout: float = attrs.field(default=5.0)
    #: Port forwards bound at start (ForwardSpec or "PROTO:[BIND:]HOST_PORT:[ADDR:]PORT").
    forwards: tuple = attrs.field(default=(), converter=_forwards)
    #: Source address the guest sees on forwarded connections: "gateway" or "preserve".
    forward_source: str = attrs.field(default="gateway")
    #: IPv6 on the guest link (RA, NDP, DHCPv6, NAT over IPv6); off drops
    #: every IPv6 frame (counted).
    ipv6: bool = attrs.field(default=True)
    #: The guest's IPv6 prefix: gateway (and DNS) ::1, first guest ::2.
    ipv6_subnet: ipaddress.IPv6Network = attrs.field(default="fd00::/64", converter=_network6)
    #: Other addresses in the prefix (slirp4netns -6 uses ::2, ::3 and ::100);
    #: None means the defaults above, and the DNS server is the gateway.
    ipv6_gateway: ipaddress.IPv6Address | None = attrs.field(default=None,
                                                             converter=_optional_address6)
    ipv6_dns: ipaddress.IPv6Address | None = attrs.field(default=None,
                                                         converter=_optional_address6)
    ipv6_guest: ipaddress.IPv6Address | None = attrs.field(default=None,
                                                           converter=_optional_address6)

    def __attrs_post_init__(self):
        net = self.subnet
        if net.prefixlen > 30:
            raise ConfigError(f"subnet {net} is too small: it needs room for a gateway and a guest")
        for name in ("gateway", "guest"):
            addr = getattr(self, name)
            if addr not in net:
                raise ConfigError(f"{name} {addr} is not inside subnet {net}")
            if addr in (net.network_address, net.broadcast_address):
                raise ConfigError(f"{name} {addr} is the network or broadcast address of {net}")
        if self.guest == self.gateway:
            raise ConfigError(f"guest and gateway are both {self.gateway}")
        if not isinstance(self.mtu, int) or not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ConfigError(f"mtu {self.mtu!r} is out of range {MIN_MTU}..{MAX_MTU}")
        if not isinstance(self.lease_time, int) or self.lease_time < 10:
            raise ConfigError(f"lease time {self.lease_time!r} must be at least 10 seconds")
        if not is_unicast(self.gateway_mac):
            raise ConfigError(f"gateway MAC {mac_to_str(self.gateway_mac)} is not unicast")
        if not isinstance(self.connect_timeout, (int, float)) or not 0 < self.connect_timeout <= 600:
            raise ConfigError(f"connect timeout {self.connect_timeout!r} must be in (0, 600] seconds")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ConfigError(f"max connections {self.max_connections!r} must be at least 1")
        if not isinstance(self.max_half_open, int) or self.max_half_open < 1:
            raise ConfigError(f"max half-open {self.max_half_open!r} must be at least 1")
        for name in ("udp_timeout", "udp_established_timeout", "dns_timeout", "tcp_fin_timeout",
                     "tcp_close_wait_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name.replace('_', ' ')} {value!r} must be a positive number of seconds")
        if not isinstance(self.max_udp_flows, int) or self.max_udp_flows < 1:
            raise ConfigError(f"max UDP flows {self.max_udp_flows!r} must be at least 1")
        if self.forward_source not in ("gateway", "preserve"):
            raise ConfigError(f"forward source {self.forward_source!r} must be gateway or preserve")
        for spec in self.forwards:
            spec.check_guest(self)
        if self.ipv6_subnet.prefixlen > 120:
            raise ConfigError(f"IPv6 subnet {self.ipv6_subnet} is too small")
        for name in ("gateway6", "dns6", "guest6"):
            addr = getattr(self, name)
            if addr not in self.ipv6_subnet or addr == self.ipv6_subnet.network_address:
                raise ConfigError(f"IPv6 {name[:-1]} {addr} is not an address of "
                                  f"{self.ipv6_subnet}")
        if self.guest6 in (self.gateway6, self.dns6):
            raise ConfigError(f"IPv6 guest {self.guest6} is the gateway's or DNS server's")
        seen_virtual = set()
        for virtual, host in self.address_map:
            if virtual in seen_virtual:
                raise ConfigError(f"address {virtual} is mapped twice")
            if virtual == self.guest or virtual in self.subnet and virtual != self.gateway:
                raise ConfigError(f"cannot map {virtual}: it is a guest address of {self.subnet}")
            if virtual in self.ipv6_subnet and virtual != self.gateway6 \
                    or virtual.version == 6 and virtual.is_link_local:
                raise ConfigError(f"cannot map {virtual}: it is a guest address of "
                                  f"{self.ipv6_subnet}")
            seen_virtual.add(virtual)
        seen = set()
        for mac, ip in self.static_leases:
            lease_net = net if ip.version == 4 else self.ipv6_subnet
            if ip not in lease_net or ip in (lease_net.network_address,
                                             lease_net.broadcast_address, self.gateway,
                                             self.gateway6):
                raise ConfigError(f"static lease {mac_to_str(mac)}={ip} is not a usable "
                                  f"address of {lease_net}")
            if (mac, ip.version) in seen:
                raise ConfigError(f"static lease for {mac_to_str(mac)} given twice")
            seen.add((mac, ip.version))
        for name in (self.domain, *self.search):
            if name is not None and (not name or len(name) > 253 or " " in name):
                raise ConfigError(f"{name!r} is not a domain name")

    @property
    def dns_server(self):
        return self.dns or self.gateway

    @property
    def gateway6(self):
        """The IPv6 gateway and host-loopback alias (fd00::1)."""
        return self.ipv6_gateway or self.ipv6_subnet.network_address + 1

    @property
    def dns6(self):
        """The IPv6 DNS server (the gateway unless set)."""
        return self.ipv6_dns or self.gateway6

    @property
    def guest6(self):
        """The first guest's DHCPv6 address (fd00::2)."""
        return self.ipv6_guest or self.ipv6_subnet.network_address + 2

    @property
    def owned_addresses6(self):
        """IPv6 addresses the stack answers NDP and echo for."""
        return {self.gateway6, self.dns6, self.router_link_local}

    #: The router's link-local address: RAs and NDP come from it.
    router_link_local = ipaddress.IPv6Address("fe80::1")

    @property
    def netmask(self):
        return self.subnet.netmask

    @property
    def owned_addresses(self):
        """Addresses the stack answers ARP for."""
        return {a for a in (self.gateway, self.dns_server) if a in self.subnet}

    def to_json(self):
        """Every field as JSON values that ``StackConfig(**value)`` takes back
        (how a queue worker process gets the stack's configuration)."""
        return {field.name: _jsonable(getattr(self, field.name))
                for field in attrs.fields(type(self))}

    def summary(self):
        v6 = f" ipv6 {self.ipv6_subnet} gateway {self.gateway6}" if self.ipv6 else " no ipv6"
        return (f"subnet {self.subnet} gateway {self.gateway} guest {self.guest} "
                f"dns {self.dns_server} mtu {self.mtu}{v6}")


def _jsonable(value):
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv4Network, ipaddress.IPv6Address,
                          ipaddress.IPv6Network)):
        return str(value)
    if isinstance(value, bytes):
        return mac_to_str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # a ForwardSpec: its str() is what ForwardSpec.parse takes
