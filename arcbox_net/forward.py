"""Port forwarding: host listeners whose clients are relayed into the guest.

``ForwardSpec`` is the value (parsed from ``--forward`` or the API's JSON);
``ForwardManager`` binds listeners with Twisted endpoints and keeps the
live ``Forward`` objects. TCP clients become active opens to the guest in
the TCP NAT (``TcpNat.inbound_factory``); UDP clients get a per-client source
port on the gateway (``UdpForwarder``).
"""

import ipaddress
import itertools
import random

import attrs
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from .config import ConfigError

PROTOCOLS = ("tcp", "udp")
SOURCE_MODES = ("gateway", "preserve")


class ForwardError(Exception):
    """A forward could not be made; ``status`` is the HTTP status for the API."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _port(text, what, lowest=1):
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {text!r} is not a port number") from None
    if not lowest <= port < 65536:
        raise ConfigError(f"{what} {port} is out of range {lowest}..65535")
    return port


def _addr(text, what):
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an IPv4 address") from None


def _looks_like_address(text):
    return "." in text


@attrs.frozen
class ForwardSpec:
    """PROTO:[BIND_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT as a value."""

    protocol: str
    host_port: int
    guest_port: int
    bind: ipaddress.IPv4Address = ipaddress.IPv4Address("127.0.0.1")
    #: None means the leased guest address.
    guest: ipaddress.IPv4Address | None = None

    @classmethod
    def parse(cls, text):
        parts = text.strip().split(":")
        if len(parts) < 3:
            raise ConfigError(f"forward {text!r} is not PROTO:[BIND_ADDR:]HOST_PORT:GUEST_PORT")
        protocol, rest = parts[0].lower(), parts[1:]
        if protocol not in PROTOCOLS:
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
                   guest_port=_port(guest_port, "guest port"), bind=_addr(bind, "bind address"),
                   guest=None if guest is None else _addr(guest, "guest address"))

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
        if protocol not in PROTOCOLS:
            raise ConfigError("protocol must be tcp or udp")
        listen = str(listen)
        bind, sep, host_port = listen.rpartition(":")
        if not sep:
            bind, host_port = "127.0.0.1", listen
        guest = str(guest)
        guest_addr, sep, guest_port = guest.rpartition(":")
        return cls(protocol=protocol, host_port=_port(host_port, "listen port", lowest=0),
                   guest_port=_port(guest_port, "guest port"), bind=_addr(bind, "listen address"),
                   guest=_addr(guest_addr, "guest address") if sep else None)

    def __str__(self):
        guest = f"{self.guest}:{self.guest_port}" if self.guest else str(self.guest_port)
        return f"{self.protocol}:{self.bind}:{self.host_port}:{guest}"


class Forward:
    """A live forward: its spec, its listener and the stack it feeds."""

    def __init__(self, fid, spec, manager):
        self.id = fid
        self.spec = spec
        self.manager = manager
        self.listener = None
        #: The port really bound (differs from the spec's when that is 0).
        self.host_port = spec.host_port

    @property
    def guest_port(self):
        return self.spec.guest_port

    def guest_address(self):
        """The explicit guest address, else the leased one, else the first guest."""
        if self.spec.guest is not None:
            return self.spec.guest
        return self.manager.leased_guest_address()

    def source_for(self, client):
        """(source address bytes, preferred port) the guest sees for ``client``."""
        manager = self.manager
        if manager.source_mode == "preserve":
            try:
                addr = ipaddress.IPv4Address(client.host)
            except ValueError:
                addr = None
            if addr is not None and not addr.is_loopback and addr not in manager.config.subnet:
                return addr.packed, client.port
        return manager.config.gateway.packed, None

    def to_json(self):
        guest = self.spec.guest or self.manager.leased_guest_address()
        return {"id": self.id, "protocol": self.spec.protocol,
                "listen": f"{self.spec.bind}:{self.host_port}",
                "guest": f"{guest}:{self.spec.guest_port}",
                "guest_address_explicit": self.spec.guest is not None}


class ForwardManager:
    log = Logger()

    def __init__(self, stack, source_mode="gateway"):
        if source_mode not in SOURCE_MODES:
            raise ConfigError(f"forward source must be one of {', '.join(SOURCE_MODES)}")
        self.stack = stack
        self.config = stack.config
        self.reactor = stack.reactor
        self.source_mode = source_mode
        self.forwards = {}
        self._ids = itertools.count(1)

    def leased_guest_address(self):
        stack = self.stack
        mac = stack.dispatcher.guest_mac
        if mac is not None:
            lease = stack.dhcp.core.lease_for(mac)
            if lease is not None and lease.state == "bound":
                return lease.address
        return self.config.guest

    def add(self, spec):
        """Bind the listener; a Deferred firing with the Forward (or ForwardError)."""
        if isinstance(spec, str):
            try:
                spec = ForwardSpec.parse(spec)
            except ConfigError as e:
                return defer.fail(ForwardError(str(e)))
        for other in self.forwards.values():
            if spec.host_port and (other.spec.protocol, other.spec.bind, other.host_port) == \
                    (spec.protocol, spec.bind, spec.host_port):
                return defer.fail(ForwardError(
                    f"{spec.protocol} {spec.bind}:{spec.host_port} is already forwarded "
                    f"(forward {other.id})", status=409))
        forward = Forward(str(next(self._ids)), spec, self)
        try:
            if spec.protocol == "tcp":
                endpoint = TCP4ServerEndpoint(self.reactor, spec.host_port, interface=str(spec.bind))
                d = endpoint.listen(self.stack.tcp.inbound_factory(forward))
            else:
                d = defer.maybeDeferred(self.stack.udp_forwarder.listen, forward)
        except Exception as e:  # pragma: no cover - endpoints report via the Deferred
            d = defer.fail(e)

        def bound(listener):
            forward.listener = listener
            forward.host_port = listener.getHost().port
            self.forwards[forward.id] = forward
            self.log.info("forwarding {spec} (forward {id})", spec=str(spec), id=forward.id)
            self.stack.emit("forward-added", forward.to_json())
            return forward

        def failed(failure):
            err = failure.value
            reason = getattr(err, "socketError", None) or err
            reason = getattr(reason, "strerror", None) or str(reason)
            if failure.check(CannotListenError) or isinstance(err, OSError):
                raise ForwardError(f"cannot listen on {spec.protocol} {spec.bind}:{spec.host_port}: "
                                   f"{reason}", status=409)
            raise ForwardError(f"cannot forward {spec}: {reason}")

        return d.addCallbacks(bound, failed)

    def remove(self, fid):
        """Close the listener (connections in progress go on); Deferred of None."""
        forward = self.forwards.pop(str(fid), None)
        if forward is None:
            return defer.fail(ForwardError(f"no forward with id {fid!r}", status=404))
        self.stack.emit("forward-removed", forward.to_json())
        d = defer.maybeDeferred(forward.listener.stopListening)
        return d.addCallback(lambda _: None)

    def stop(self):
        return defer.gatherResults([self.remove(fid) for fid in list(self.forwards)],
                                   consumeErrors=True)

    def list(self):
        return [f.to_json() for f in self.forwards.values()]


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
        from .protocols.udp_nat import ExpiryTimer, FlowTable
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
        guest_ip = forward.guest_address().packed
        src_ip, preferred = forward.source_for(TwistedAddress("UDP", *client))
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
                "guest": f"{ipaddress.IPv4Address(gip)}:{gport}",
                "remote": f"{ipaddress.IPv4Address(sip)}:{sport}",
                "host": f"{flow.client[0]}:{flow.client[1]}",
                "state": "established" if flow.established else "unreplied",
                "bytes_to_guest": flow.bytes_out, "bytes_from_guest": flow.bytes_in,
                "age": round(now - flow.created, 3),
            })
        return out
