"""slirp4netns's JSON API (``--api-socket``) over the stack's forwards.

One request per connection, as slirp4netns: ``{"execute": "add_hostfwd" |
"list_hostfwd" | "remove_hostfwd", "arguments": {...}}`` answered with
``{"return": {...}}`` or ``{"error": {"desc": "..."}}``, then the connection
is closed. The field names (proto, host_addr, host_port, guest_addr,
guest_port, id) and the error texts are slirp4netns's. The forwards are the
stack's own (``NetworkStack.add_forward`` and friends), so they also show in
arcbox-net's control API, and a forward made there is listed here.

``SlirpApi`` is the protocol core (bytes in, a Deferred of bytes out);
``SlirpApiProtocol`` reads one request from a connection: it answers as
soon as what came parses as JSON, at the client's half-close or end, or
after a short wait, whichever is first.
"""

import ipaddress
import json
import os
import socket

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..link.unixsock import remove_stale_socket

#: slirp4netns reads one request into a 4096-byte buffer.
MAX_REQUEST = 4096
#: How long an unfinished request may wait for the rest (seconds).
REQUEST_WAIT = 1.0


def _dumps(value):
    return json.dumps(value, separators=(",", ":")).encode()


def error(desc):
    return _dumps({"error": {"desc": desc}})


def _number(arguments, name):
    """What slirp4netns's json_object_dotget_number gives: the integer part of
    a JSON number, 0 when absent or not a number."""
    value = arguments.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value)


class SlirpApi:
    """slirp4netns's three API calls on ``stack`` (a NetworkStack or anything
    with add_forward/remove_forward/forwards); ``default_guest`` is the
    address a forward without guest_addr goes to (slirp4netns's .100)."""

    log = Logger()

    def __init__(self, stack, default_guest):
        self.stack = stack
        self.default_guest = ipaddress.IPv4Address(default_guest)

    def handle(self, data):
        """A Deferred firing with the reply (bytes) to request ``data``."""
        if len(data) >= MAX_REQUEST:
            return defer.succeed(error("bad request: too large message"))
        try:
            request = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return defer.succeed(error("bad request: cannot parse JSON"))
        if not isinstance(request, dict):
            return defer.succeed(error("bad request: json_object() failed"))
        execute = request.get("execute")
        if not isinstance(execute, str):
            return defer.succeed(error("bad request: no execute found"))
        arguments = request.get("arguments")
        if not isinstance(arguments, dict):
            arguments = {}
        handler = {"add_hostfwd": self.add_hostfwd, "list_hostfwd": self.list_hostfwd,
                   "remove_hostfwd": self.remove_hostfwd}.get(execute)
        if handler is None:
            return defer.succeed(error("bad request: unknown execute"))
        return defer.maybeDeferred(handler, arguments)

    def add_hostfwd(self, arguments):
        bad = "bad request: add_hostfwd: bad arguments."
        proto = arguments.get("proto")
        if proto not in ("tcp", "udp"):
            return error(bad + "proto")
        host_addr = arguments.get("host_addr") or "0.0.0.0"
        try:
            host_addr = ipaddress.IPv4Address(host_addr)
        except ValueError:
            return error(bad + "host_addr")
        host_port = _number(arguments, "host_port")
        if not 0 < host_port < 65536:
            return error(bad + "host_port")
        guest_addr = arguments.get("guest_addr") or self.default_guest
        try:
            guest_addr = ipaddress.IPv4Address(guest_addr)
        except ValueError:
            return error(bad + "guest_addr")
        guest_port = _number(arguments, "guest_port")
        if not 0 < guest_port < 65536:
            return error(bad + "guest_port")
        spec = f"{proto}:{host_addr}:{host_port}:{guest_addr}:{guest_port}"
        d = defer.maybeDeferred(self.stack.add_forward, spec)

        def added(forward):
            return _dumps({"return": {"id": int(forward["id"])}})

        def failed(failure):
            reason = failure.getErrorMessage()
            self.log.warn("add_hostfwd {spec}: {reason}", spec=spec, reason=reason)
            return error(f"bad request: add_hostfwd: {reason}")
        return d.addCallbacks(added, failed)

    def list_hostfwd(self, arguments):
        entries = []
        for forward in self.stack.forwards():
            entry = entry_of(forward)
            if entry is not None:
                entries.append(entry)
        # slirp4netns 1.2 answers {"entries": [...]} without "return"; clients
        # written to either form find theirs.
        return _dumps({"return": {"entries": entries}, "entries": entries})

    def remove_hostfwd(self, arguments):
        fid = _number(arguments, "id")
        known = {str(f["id"]) for f in self.stack.forwards()}
        if fid <= 0 or str(fid) not in known:
            return error("bad request: remove_hostfwd: bad arguments.id")
        d = defer.maybeDeferred(self.stack.remove_forward, str(fid))
        return d.addCallbacks(
            lambda _: _dumps({"return": {}}),
            lambda f: error(f"bad request: remove_hostfwd: {f.getErrorMessage()}"))


def entry_of(forward):
    """A stack forward's JSON (id, protocol, listen, guest) as slirp4netns's
    list_hostfwd entry; None if it does not fit (a non-numeric id)."""
    try:
        fid = int(forward["id"])
        host_addr, _, host_port = forward["listen"].rpartition(":")
        guest_addr, _, guest_port = forward["guest"].rpartition(":")
        return {"id": fid, "proto": forward["protocol"], "host_addr": host_addr,
                "host_port": int(host_port), "guest_addr": guest_addr,
                "guest_port": int(guest_port)}
    except (KeyError, ValueError, AttributeError):
        return None


@implementer(IHalfCloseableProtocol)
class SlirpApiProtocol(Protocol):
    """One connection: read one request, write the reply, close."""

    def __init__(self, api, clock):
        self.api = api
        self.clock = clock
        self.buffer = b""
        self.answered = False
        self._wait = None

    def connectionMade(self):
        self._wait = self.clock.callLater(REQUEST_WAIT, self._answer)

    def dataReceived(self, data):
        if self.answered:
            return
        self.buffer += data
        if len(self.buffer) >= MAX_REQUEST:
            self._answer()
            return
        try:
            json.loads(self.buffer)
        except ValueError:
            return  # maybe more is coming
        self._answer()

    def readConnectionLost(self):
        self._answer()

    def writeConnectionLost(self):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self._cancel_wait()
        self.answered = True

    def _cancel_wait(self):
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        self._wait = None

    def _answer(self):
        if self.answered:
            return
        self.answered = True
        self._cancel_wait()
        d = self.api.handle(self.buffer)

        def reply(data):
            if self.transport is not None and self.transport.connected:
                self.transport.write(data)
                self.transport.loseConnection()
        d.addCallback(reply)
        d.addErrback(lambda f: self.transport.loseConnection())


class SlirpApiFactory(Factory):
    noisy = False

    def __init__(self, api, clock):
        self.api = api
        self.clock = clock

    def buildProtocol(self, addr):
        return SlirpApiProtocol(self.api, self.clock)


def listen_slirp_api(api, path, reactor):
    """Listen on unix socket ``path`` (a stale socket file there is replaced, as
    slirp4netns does; a live one or another kind of file is an error); returns
    the listening port."""
    remove_stale_socket(path, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        return reactor.listenUNIX(path, SlirpApiFactory(api, reactor), mode=0o600)
    finally:
        os.umask(old)
