"""Port forwarding: host listeners whose clients are relayed into the guest.

``config.ForwardSpec`` is the value (parsed from ``--forward`` or the API's
JSON); ``ForwardManager`` binds listeners with Twisted endpoints and keeps the
live ``Forward`` objects. TCP clients become active opens to the guest in
the TCP NAT (``TcpNat.inbound_factory``); UDP clients get a per-client source
port on the gateway (``udp_nat.UdpForwarder``).
"""

import ipaddress
import itertools

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from .config import ConfigError, ForwardSpec

SOURCE_MODES = ("gateway", "preserve")


class ForwardError(Exception):
    """A forward could not be made; ``status`` is the HTTP status for the API."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


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

    def source_for(self, client, guest=None):
        """(source address bytes, preferred port) the guest sees for
        ``client``: the gateway of the guest address's family, or with
        "preserve" the client's own address when it is of that family, not
        loopback and not inside the guest's subnet."""
        manager = self.manager
        config = manager.config
        if guest is None:
            guest = self.guest_address()
        if manager.source_mode == "preserve":
            try:
                addr = ipaddress.ip_address(client.host.partition("%")[0])
            except ValueError:
                addr = None
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            subnet = config.subnet if guest.version == 4 else config.ipv6_subnet
            if addr is not None and addr.version == guest.version and not addr.is_loopback \
                    and not addr.is_link_local and addr not in subnet:
                return addr.packed, client.port
        gateway = config.gateway if guest.version == 4 else config.gateway6
        return gateway.packed, None

    def to_json(self):
        guest = self.spec.guest or self.manager.leased_guest_address()
        return {"id": self.id, "protocol": self.spec.protocol,
                "listen": _endpoint(self.spec.bind, self.host_port),
                "guest": _endpoint(guest, self.spec.guest_port),
                "guest_address_explicit": self.spec.guest is not None}


def _endpoint(address, port):
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


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
        try:
            spec.check_guest(self.config)
        except ConfigError as e:
            return defer.fail(ForwardError(str(e)))
        for other in self.forwards.values():
            if spec.host_port and (other.spec.protocol, other.spec.bind, other.host_port) == \
                    (spec.protocol, spec.bind, spec.host_port):
                return defer.fail(ForwardError(
                    f"{spec.protocol} {_endpoint(spec.bind, spec.host_port)} is already forwarded "
                    f"(forward {other.id})", status=409))
        forward = Forward(str(next(self._ids)), spec, self)
        try:
            if spec.protocol == "tcp":
                kind = TCP6ServerEndpoint if spec.bind.version == 6 else TCP4ServerEndpoint
                endpoint = kind(self.reactor, spec.host_port, interface=str(spec.bind))
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
                raise ForwardError(f"cannot listen on {spec.protocol} "
                                   f"{_endpoint(spec.bind, spec.host_port)}: {reason}",
                                   status=409)
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
