"""The control API: HTTP/JSON on a unix socket (``--api PATH``, mode 0600).

Routes (see docs/control-api.md):
  GET /forwards, POST /forwards, DELETE /forwards/{id}
  GET /leases, GET /connections, GET /stats, GET /metrics (Prometheus text)

A thin twisted.web layer over NetworkStack's embedding API; every error is
a JSON ``{"error": ...}`` with a 4xx status, and nothing a client sends can
raise out of here (a JSON body nested too deeply is a 400 like any bad
JSON). A body longer than ``MAX_BODY`` is refused with 413 as soon as its
length is known or its bytes pass the limit (``LimitedRequest``), before
it is spooled anywhere; the connection is then closed. ``POST /capture``
only creates a new file (O_EXCL|O_NOFOLLOW): it never truncates one and
never follows a symlink.
"""

import io
import json
import os
import socket

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.logger import Logger
from twisted.web import resource, server

from .forward import ForwardError
from .config import ConfigError, ForwardSpec
from .link.unixsock import remove_stale_socket
from .ratelimit import LimitedLog

MAX_BODY = 64 * 1024
_BAD_JSON = (ValueError, UnicodeDecodeError, RecursionError)
_limited_log = LimitedLog(Logger(namespace=__name__))


class LimitedRequest(server.Request):
    """A request whose body is kept in memory up to MAX_BODY and refused
    (413, connection closed) the moment it would exceed it: by its declared
    Content-Length, or by the bytes of a chunked body as they arrive."""

    _refused = False

    def gotLength(self, length):
        self._received = 0
        self.content = io.BytesIO()
        if length is not None and length > MAX_BODY:
            self._refuse()

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self.content = io.BytesIO()
            self._refuse()
            return
        self.content.write(data)

    def _refuse(self):
        self._refused = True
        body = json.dumps({"error": f"request body over {MAX_BODY} bytes"}).encode() + b"\n"
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\n"
                        b"Content-Type: application/json\r\nConnection: close\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        transport.loseConnection()

    def process(self):
        if self._refused:
            return
        super().process()


class ApiResource(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StackCollector(stack))

    def render(self, request):
        try:
            return self._route(request)
        except Exception:
            _limited_log.failure("control API request failed")
            return _json(request, 500, {"error": "internal error"})

    def _route(self, request):
        method = request.method.decode("ascii", "replace")
        parts = [p for p in request.path.decode("utf-8", "replace").split("/") if p]
        stack = self.stack
        if parts == ["forwards"]:
            if method == "GET":
                return _json(request, 200, stack.forwards())
            if method == "POST":
                return self._add_forward(request)
            return _method_not_allowed(request, "GET, POST")
        if len(parts) == 2 and parts[0] == "forwards":
            if method == "GET":
                for f in stack.forwards():
                    if f["id"] == parts[1]:
                        return _json(request, 200, f)
                return _json(request, 404, {"error": f"no forward with id {parts[1]!r}"})
            if method == "DELETE":
                return self._remove_forward(request, parts[1])
            return _method_not_allowed(request, "GET, DELETE")
        views = {"leases": stack.leases, "connections": stack.connections, "stats": stack.stats}
        if len(parts) == 1 and parts[0] in views:
            if method != "GET":
                return _method_not_allowed(request, "GET")
            return _json(request, 200, views[parts[0]]())
        if parts == ["capture"]:
            return self._capture(request, method)
        if parts == ["metrics"]:
            if method != "GET":
                return _method_not_allowed(request, "GET")
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            return generate_latest(self.registry)
        return _json(request, 404, {"error": f"no such route: {method} {request.path.decode('utf-8', 'replace')}"})

    def _add_forward(self, request):
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            return _json(request, 413, {"error": "request body too large"})
        try:
            data = json.loads(body)
        except _BAD_JSON as e:
            return _json(request, 400, {"error": f"bad JSON: {_first_line(e)}"})
        try:
            spec = ForwardSpec.from_json(data)
        except ConfigError as e:
            return _json(request, 400, {"error": str(e)})
        d = self.stack.add_forward(spec)
        d.addCallback(lambda forward: _finish(request, 201, forward))
        d.addErrback(lambda f: _finish(request, *_error_of(f)))
        return server.NOT_DONE_YET

    def _capture(self, request, method):
        """GET: the running capture; POST {"path": FILE}: start one; DELETE: stop it."""
        stack = self.stack
        current = stack.dispatcher.capture
        if method == "GET":
            if current is None or not current.active:
                return _json(request, 200, {"active": False})
            return _json(request, 200, {"active": True, **current.stats()})
        if method == "POST":
            body = request.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                return _json(request, 413, {"error": "request body too large"})
            try:
                data = json.loads(body)
            except _BAD_JSON as e:
                return _json(request, 400, {"error": f"bad JSON: {_first_line(e)}"})
            if not isinstance(data, dict) or set(data) != {"path"} \
                    or not isinstance(data["path"], str) or not data["path"] \
                    or "\x00" in data["path"]:
                return _json(request, 400, {"error": 'expected {"path": "FILE"}'})
            try:
                capture = stack.start_capture(data["path"], exclusive=True)
            except RuntimeError as e:
                return _json(request, 409, {"error": str(e)})
            except FileExistsError:
                return _json(request, 409, {"error": f"{data['path']} exists; a capture "
                                                     "only creates a new file"})
            except (OSError, ValueError) as e:
                reason = getattr(e, "strerror", None) or str(e)
                return _json(request, 400, {"error": f"cannot create {data['path']}: {reason}"})
            return _json(request, 201, {"active": True, **capture.stats()})
        if method == "DELETE":
            stats = stack.stop_capture()
            if stats is None:
                return _json(request, 404, {"error": "no capture is running"})
            return _json(request, 200, {"active": False, **stats})
        return _method_not_allowed(request, "GET, POST, DELETE")

    def _remove_forward(self, request, fid):
        d = self.stack.remove_forward(fid)
        d.addCallback(lambda _: _finish(request, 204, None))
        d.addErrback(lambda f: _finish(request, *_error_of(f)))
        return server.NOT_DONE_YET


def _first_line(error):
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _error_of(failure):
    if failure.check(ForwardError):
        return failure.value.status, {"error": str(failure.value)}
    return 500, {"error": failure.getErrorMessage()}


def _json(request, status, value):
    request.setResponseCode(status)
    if value is None:
        return b""
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, indent=1).encode() + b"\n"


def _finish(request, status, value):
    if request._disconnected:
        return
    body = _json(request, status, value)
    if body:
        request.write(body)
    request.finish()


def _method_not_allowed(request, allowed):
    request.setHeader(b"allow", allowed.encode())
    return _json(request, 405, {"error": f"method not allowed; use {allowed}"})


class StackCollector:
    """Prometheus view of NetworkStack.stats(), read at scrape time."""

    def __init__(self, stack):
        self.stack = stack

    def collect(self):
        stats = self.stack.stats()
        frames = CounterMetricFamily("arcbox_frames", "Ethernet frames", labels=["direction"])
        frames.add_metric(["in"], stats["frames_in"])
        frames.add_metric(["out"], stats["frames_out"])
        yield frames
        drops = CounterMetricFamily("arcbox_drops", "Dropped frames and datagrams by reason",
                                    labels=["reason"])
        for reason, n in sorted(stats["drops"].items()):
            drops.add_metric([reason], n)
        yield drops
        events = CounterMetricFamily("arcbox_events", "Protocol events", labels=["event"])
        for name, n in sorted(stats.get("counters", {}).items()):
            events.add_metric([name], n)
        yield events
        flows = GaugeMetricFamily("arcbox_flows", "Open TCP connections and UDP/ICMP flows",
                                  labels=["protocol"])
        counts = {}
        for flow in self.stack.connections():
            counts[flow["protocol"]] = counts.get(flow["protocol"], 0) + 1
        for proto in ("tcp", "udp", "icmp"):
            flows.add_metric([proto], counts.get(proto, 0))
        yield flows
        yield GaugeMetricFamily("arcbox_leases", "DHCP leases", value=len(self.stack.leases()))
        yield GaugeMetricFamily("arcbox_forwards", "Port forwards", value=len(self.stack.forwards()))
        yield GaugeMetricFamily("arcbox_link_queued_frames", "Frames waiting for the guest link",
                                value=stats["link"]["queued_frames"])


def listen_api(stack, path, reactor):
    """Serve the API on unix socket ``path`` (mode 0600); returns the listening port."""
    remove_stale_socket(path, socket.SOCK_STREAM)
    site = server.Site(ApiResource(stack), requestFactory=LimitedRequest)
    site.noisy = False
    site.displayTracebacks = False
    old = os.umask(0o177)
    try:
        return reactor.listenUNIX(path, site, mode=0o600)
    finally:
        os.umask(old)
