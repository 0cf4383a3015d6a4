"""The unix-socket transports against QEMU's own implementation.

No guest is booted: QEMU (``-machine none``) relays a TAP inside a test
namespace to its ``-netdev stream`` / ``-netdev dgram`` backend through a
hub, so the namespace is the guest and QEMU speaks the framing to
arcbox-net. Everything the guest reaches is on loopback (the gateway maps to
127.0.0.1; the egress policy denies everything else).
"""

import functools
import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import dpkt
import pytest

from conftest import TWISTD, guest_tcp_client, in_ns, run, udhcpc
from hostside import HostServer, sender, sink_then_reply

SAFE = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8"]
from tcpclient import data_chunks  # noqa: E402

QEMU = "qemu-system-x86_64"


def require_qemu():
    if shutil.which(QEMU) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{QEMU} is missing; scripts/setup.sh should have installed it")
        pytest.skip(f"{QEMU} is not installed")


class QemuRelay:
    """QEMU relaying tap0 (inside ``ns``) to one socket netdev through hub 0."""

    def __init__(self, ns, netdev, log_path):
        self.ns = ns
        self.netdev = netdev
        self.log_path = log_path
        self.proc = None

    def start(self, wait_for_tap=True, timeout=15):
        cmd = ["ip", "netns", "exec", self.ns, QEMU, "-machine", "none", "-nodefaults",
               "-display", "none",
               "-netdev", "tap,id=t0,ifname=tap0,script=no,downscript=no",
               "-netdev", self.netdev,
               "-netdev", "hubport,id=h0,hubid=0,netdev=t0",
               "-netdev", "hubport,id=h1,hubid=0,netdev=s0"]
        with open(self.log_path, "a") as log:
            # `ip netns exec` execs QEMU: this pid is QEMU's.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        if wait_for_tap:
            self.wait_for_tap(timeout)
        return self

    def wait_for_tap(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}):\n{self.log()}")
            if run(["ip", "-n", self.ns, "link", "show", "tap0"], check=False).returncode == 0:
                run(["ip", "-n", self.ns, "link", "set", "tap0", "up"])
                return
            time.sleep(0.05)
        raise AssertionError(f"QEMU made no tap0:\n{self.log()}")

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def kill(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def qemu(netns, tmp_path):
    """Start QEMU relays in the test namespace; every one is killed at teardown."""
    require_qemu()
    started = []

    def start(netdev, **kwargs):
        relay = QemuRelay(netns, netdev, tmp_path / f"qemu-{len(started)}.log")
        started.append(relay)
        return relay.start(**kwargs)

    try:
        yield start
    finally:
        for relay in started:
            relay.kill()


def stream_client(path):
    return f"stream,id=s0,server=off,addr.type=unix,addr.path={path}"


def stream_server(path):
    return f"stream,id=s0,server=on,addr.type=unix,addr.path={path}"


def dgram(local, remote):
    return (f"dgram,id=s0,local.type=unix,local.path={local},"
            f"remote.type=unix,remote.path={remote}")


client = functools.partial(guest_tcp_client, timeout=300)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path):
    """An HTTP server on 127.0.0.1 serving a page and a 2 MB blob."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello through qemu\n")
    blob = os.urandom(2 * 1024 * 1024)
    (root / "blob").write_bytes(blob)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], blob
    finally:
        server.shutdown()
        server.server_close()


def exercise_guest(ns, tmp_path, web, size=50 * 1024 * 1024, lease_ip="10.0.2.2"):
    """DHCP, ping, curl and a sha256-checked transfer each way."""
    lease = udhcpc(ns, tmp_path / f"lease-{lease_ip}")
    assert lease["ip"] == lease_ip and lease["router"] == "10.0.2.1"
    out = in_ns(ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.1").stdout
    assert "3 packets transmitted, 3 received" in out
    port, blob = web
    page = in_ns(ns, "curl", "-sS", "--max-time", "20", f"http://10.0.2.1:{port}/index.html")
    assert page.stdout == "hello through qemu\n"
    got = tmp_path / "blob.got"
    in_ns(ns, "curl", "-sS", "--max-time", "60", "-o", str(got), f"http://10.0.2.1:{port}/blob")
    assert got.read_bytes() == blob
    if not size:
        return
    up = HostServer(sink_then_reply)
    try:
        out = client(ns, "send", "10.0.2.1", up.port, size, 7)
        up.wait()
        assert not up.errors
        assert up.results[0] == (out["sent_sha256"], size)
        assert out["reply"] == f"{out['sent_sha256']}:{size}"
    finally:
        up.close()
    down = HostServer(sender(lambda: data_chunks(size, 11)))
    try:
        out = client(ns, "recv", "10.0.2.1", down.port)
        down.wait()
        assert out["bytes"] == size and out["sha256"] == down.results[0]
    finally:
        down.close()


def assert_alive(stack):
    assert stack.proc.poll() is None, stack.log()


def test_qemu_stream_client_to_listen_stream(netns, qemu, stack_factory, tmp_path, web):
    sock = tmp_path / "arcbox.sock"
    stack = stack_factory("--listen-stream", str(sock), *SAFE)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    relay = qemu(stream_client(sock))
    exercise_guest(netns, tmp_path, web)

    # QEMU goes away: the stack logs it and keeps listening...
    relay.kill()
    deadline = time.monotonic() + 10
    while "peer disconnected" not in stack.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "peer disconnected" in stack.log()
    assert_alive(stack)
    # ...and the next QEMU (a new guest NIC, a new MAC) is served.
    qemu(stream_client(sock))
    exercise_guest(netns, tmp_path, web, size=0, lease_ip="10.0.2.3")
    assert_alive(stack)
    assert "Traceback" not in stack.log()


def test_qemu_dgram_to_listen_dgram(netns, qemu, stack_factory, tmp_path, web):
    sock = tmp_path / "arcbox.sock"
    stack = stack_factory("--listen-dgram", str(sock), *SAFE)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    relay = qemu(dgram(tmp_path / "qemu-1.sock", sock))
    exercise_guest(netns, tmp_path, web)
    # A new QEMU on a new local socket: replies follow the latest sender.
    relay.kill()
    qemu(dgram(tmp_path / "qemu-2.sock", sock))
    exercise_guest(netns, tmp_path, web, size=0, lease_ip="10.0.2.3")
    assert_alive(stack)
    log = stack.log()
    # The stack takes the new QEMU as its peer: "peer changed from A to B", or
    # "peer is B" when a send in between (a router advertisement) found A gone.
    new = str(tmp_path / "qemu-2.sock")
    assert f"to {new}" in log or f"peer is {new}" in log, log
    assert "Traceback" not in log


def test_connect_stream_to_qemu_stream_server(netns, qemu, stack_factory, tmp_path, web):
    sock = tmp_path / "qemu.sock"
    relay = qemu(stream_server(sock), wait_for_tap=False)
    deadline = time.monotonic() + 15
    while not sock.exists() and time.monotonic() < deadline:
        assert relay.proc.poll() is None, relay.log()
        time.sleep(0.05)
    stack = stack_factory("--connect-stream", str(sock), *SAFE)
    relay.wait_for_tap()
    exercise_guest(netns, tmp_path, web)
    # The only peer leaving ends a connected link: the stack exits.
    relay.kill()
    stack.proc.wait(10)
    log = stack.log()
    assert "guest link unix stream socket" in log and "lost" in log
    assert "Traceback" not in log


# -- the same links without QEMU: --fd with a stream socket, option errors ---------


def _arp_request(mac):
    arp = dpkt.arp.ARP(hrd=1, pro=0x0800, hln=6, pln=4, op=dpkt.arp.ARP_OP_REQUEST,
                       sha=mac, spa=socket.inet_aton("10.0.2.2"), tha=b"\0" * 6,
                       tpa=socket.inet_aton("10.0.2.1"))
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=mac, type=0x0806, data=arp))


def _read_frame(sock):
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        assert chunk, "EOF"
        head += chunk
    length = int.from_bytes(head, "big")
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "EOF"
        body += chunk
    return body


def _read_not_ipv6(sock):
    """The next frame that is not IPv6 (router advertisements arrive unasked)."""
    while True:
        frame = _read_frame(sock)
        if frame[12:14] != b"\x86\xdd":
            return frame


def test_fd_stream_socket_with_length_framing(stack_factory):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.settimeout(5)
    stack = stack_factory("--fd", str(theirs.fileno()), *SAFE, pass_fds=(theirs.fileno(),))
    theirs.close()
    mac = b"\x02\x11\x22\x33\x44\x55"
    request = _arp_request(mac)
    # One frame split in two writes, then two frames in one write.
    framed = len(request).to_bytes(4, "big") + request
    ours.sendall(framed[:9])
    time.sleep(0.1)
    ours.sendall(framed[9:])
    replies = [_read_not_ipv6(ours)]
    ours.sendall(framed + framed)
    replies += [_read_not_ipv6(ours), _read_not_ipv6(ours)]
    for raw in replies:
        reply = dpkt.ethernet.Ethernet(raw)
        assert reply.type == 0x0806 and reply.dst == mac
        assert reply.data.op == dpkt.arp.ARP_OP_REPLY
    # Garbage on a connected stream: reported, and (the only peer) the link ends.
    ours.sendall(b"\x00\x00\x00\x00")
    stack.proc.wait(10)
    log = stack.log()
    assert "framing error: zero-length frame" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("args, message", [
    (["--listen-stream", "/tmp/x", "--netns", "y"], "give exactly one of --fd, --tap, --netns, "
                                                    "--listen-stream, --connect-stream, "
                                                    "--listen-dgram"),
    (["--listen-dgram", "/tmp/x", "--connect-stream", "/tmp/y"], "give exactly one of"),
    (["--connect-stream", "/nonexistent/arcbox.sock"], "cannot connect to stream socket"),
])
def test_bad_transport_options_exit_with_one_line(args, message):
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "arcbox-net", *args],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.PIPE)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


@pytest.mark.parametrize("option", ["--listen-stream", "--listen-dgram"])
def test_listen_never_replaces_a_regular_file(option, tmp_path):
    path = tmp_path / "precious"
    path.write_text("keep me")
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "arcbox-net", option, str(path)],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.PIPE)
    assert result.returncode == 1
    assert result.stderr.strip() == f"arcbox-net: {path} exists and is not a socket; not replacing it"
    assert path.read_text() == "keep me"


def test_listen_replaces_a_stale_socket_and_removes_it_at_exit(stack_factory, tmp_path):
    sock = tmp_path / "arcbox.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    stack = stack_factory("--listen-stream", str(sock), *SAFE)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(sock))
    c.close()
    stack.stop()
    assert not sock.exists()
