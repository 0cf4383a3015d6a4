"""The control API against hostile clients: every bad request is a 4xx JSON
error (never a 500 or a traceback), oversized bodies are refused while they
arrive, forwards are validated, and POST /capture only creates new files.

Requests are raw bytes into twisted.web's real HTTP channel on a
StringTransport; the stack runs on a MemoryReactorClock."""

import json
import os
import random

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.web import server

from arcbox_net.api import MAX_BODY, ApiResource, LimitedRequest
from arcbox_net.config import StackConfig
from arcbox_net.stack import NetworkStack


class FakeLink:
    description = "fake"
    mtu = 1500

    def start(self, sink):
        pass

    def stop(self):
        pass

    def send_frame(self, frame, vnet_header=None):
        pass


@pytest.fixture
def site():
    stack = NetworkStack(FakeLink(), StackConfig(dns_upstreams=["127.0.0.1:9"]),
                         reactor=MemoryReactorClock())
    site = server.Site(ApiResource(stack), requestFactory=LimitedRequest)
    site.stack = stack
    yield site
    stack.stop_capture()


def request(site, raw):
    """Feed ``raw`` (bytes, or a list of pieces) to a fresh channel; (status,
    JSON body or text, transport)."""
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    for piece in raw if isinstance(raw, list) else [raw]:
        if transport.disconnecting:
            break
        channel.dataReceived(piece)
    out = transport.value()
    head, _, body = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else None
    if b"chunked" in head.lower():
        body = _dechunk(body)
    try:
        value = json.loads(body)
    except ValueError:
        value = body
    return status, value, transport


def _dechunk(data):
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2:]
    return out


def http(method, path, body=None, headers=()):
    lines = [f"{method} {path} HTTP/1.1", "Host: arcbox", *headers]
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    if body is not None:
        lines.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def test_deeply_nested_json_is_a_400_not_a_500(site):
    for path in ("/forwards", "/capture"):
        status, value, _ = request(site, http("POST", path, b"[" * 30000 + b"]" * 30000))
        assert status == 400 and "bad JSON" in value["error"]


def test_a_declared_length_over_the_limit_is_refused_before_any_body(site):
    raw = (b"POST /forwards HTTP/1.1\r\nHost: arcbox\r\nContent-Length: 100000000\r\n\r\n")
    status, value, transport = request(site, raw)
    assert status == 413 and "error" in value
    assert transport.disconnecting


def test_an_unterminated_chunked_body_is_refused_as_it_passes_the_limit(site):
    head = b"POST /forwards HTTP/1.1\r\nHost: arcbox\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % 8192 + b"a" * 8192 + b"\r\n"
    pieces = [head] + [chunk] * (100 * 1024 * 1024 // 8192)    # 100 MB, never terminated
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    fed = 0
    for piece in pieces:
        if transport.disconnecting:
            break
        channel.dataReceived(piece)
        fed += len(piece)
    assert transport.disconnecting
    assert fed < MAX_BODY + 3 * len(chunk)               # refused within a chunk of the limit
    assert transport.value().startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize("guest", ["10.0.2.1:80", "255.255.255.255:80", "192.0.2.5:80",
                                   "10.0.2.0:80", "10.0.2.255:80"])
def test_forwards_to_addresses_outside_the_guest_range_are_refused(site, guest):
    status, value, _ = request(site, http("POST", "/forwards", {
        "protocol": "tcp", "listen": "127.0.0.1:0", "guest": guest}))
    assert status == 400 and "not a guest address" in value["error"]
    assert site.stack.forwards() == []


@pytest.mark.parametrize("guest", ["[fd00::1]:80", "[fd00::]:80", "[fd01::5]:80",
                                   "[fe80::2]:80"])
def test_ipv6_forwards_outside_the_guest_prefix_are_refused(site, guest):
    status, value, _ = request(site, http("POST", "/forwards", {
        "protocol": "tcp", "listen": "[::1]:0", "guest": guest}))
    assert status == 400 and "not a guest address" in value["error"], value
    assert site.stack.forwards() == []


def test_an_ipv6_forward_is_made_and_shown_in_brackets(site):
    status, value, _ = request(site, http("POST", "/forwards", {
        "protocol": "tcp", "listen": "[::1]:0", "guest": "[fd00::2]:80"}))
    assert status == 201, value
    assert value["guest"] == "[fd00::2]:80" and value["listen"].startswith("[::1]:")
    (listener,) = site.stack.reactor.tcpServers
    assert listener[3] == "::1"      # interface of the listening socket


@pytest.mark.parametrize("port", [" 58795", "+59349", "56_977", "٥٠", "80 ", "-1", "0x50",
                                  "", "1e3", "99999"])
def test_ports_must_be_plain_ascii_decimal(site, port):
    for body in ({"protocol": "tcp", "listen": f"127.0.0.1:{port}", "guest": "80"},
                 {"protocol": "tcp", "listen": "127.0.0.1:0", "guest": port}):
        status, value, _ = request(site, http("POST", "/forwards", body))
        assert status == 400, (body, value)
    assert site.stack.forwards() == []


def test_a_valid_forward_is_still_made(site):
    status, value, _ = request(site, http("POST", "/forwards", {
        "protocol": "tcp", "listen": "127.0.0.1:0", "guest": "10.0.2.7:80"}))
    assert status == 201, value
    assert [f["id"] for f in site.stack.forwards()] == [value["id"]]


def test_capture_never_truncates_and_never_follows_a_symlink(site, tmp_path):
    existing = tmp_path / "keep.pcap"
    existing.write_bytes(b"precious")
    status, value, _ = request(site, http("POST", "/capture", {"path": str(existing)}))
    assert status == 409 and existing.read_bytes() == b"precious"
    link = tmp_path / "link.pcap"
    target = tmp_path / "elsewhere.pcap"
    link.symlink_to(target)
    status, value, _ = request(site, http("POST", "/capture", {"path": str(link)}))
    assert status in (400, 409) and not target.exists()
    status, value, _ = request(site, http("POST", "/capture", {"path": "a\x00b"}))
    assert status == 400
    status, value, _ = request(site, http("POST", "/capture", {"path": str(tmp_path / "n.pcap")}))
    assert status == 201 and value["active"]
    assert os.path.getsize(tmp_path / "n.pcap") == 24


def test_a_thousand_malformed_requests_get_no_500_and_no_traceback(site, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # relative capture paths land here
    rng = random.Random(6)
    events = []
    globalLogPublisher.addObserver(events.append)
    statuses = []
    try:
        fields = [None, 1, -1, 1.5, True, "", "x", "tcp", "udp", "80", " 80", "+80", "8_0",
                  "127.0.0.1:0", "10.0.2.1:80", "a" * 300, [], {}, {"a": 1}, "\x00", "\ud800x"]
        for i in range(1000):
            kind = i % 5
            method = rng.choice(["GET", "POST", "DELETE", "PUT", "PATCH"])
            path = rng.choice(["/forwards", "/forwards/1", "/forwards/%ff", "/capture",
                               "/stats", "/leases", "/connections", "/metrics", "/nope",
                               "/forwards/" + "x" * 500])
            if kind == 0:
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
            elif kind == 1:
                body = {k: rng.choice(fields) for k in rng.sample(
                    ["protocol", "listen", "guest", "path", "extra"], rng.randrange(1, 5))}
                if "path" in body and isinstance(body["path"], str):
                    body["path"] = str(tmp_path / f"f{i}") if rng.random() < 0.2 else body["path"]
                body = json.dumps(body).encode()
            elif kind == 2:
                body = b"[" * rng.randrange(1000, 50000)
            elif kind == 3:
                body = b'{"path": ' * rng.randrange(1, 3000)
            else:
                body = json.dumps(rng.choice(fields)).encode()
            status, value, _ = request(site, http(method, path, body))
            statuses.append(status)
            if path == "/capture" and status == 201:
                site.stack.stop_capture()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert 500 not in statuses and None not in statuses
    assert not [e for e in events if e.get("log_failure") is not None]
