"""Port forwarding into a real guest, and the control API on its unix socket."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import TWISTD, in_ns, run

SAFE = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8"]
from tcpclient import data_chunks  # noqa: E402


def free_port(host="127.0.0.1", kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def api(sock, method, path, body=None):
    cmd = ["curl", "-sS", "--unix-socket", str(sock), "-X", method, "-w", "\n%{http_code}",
           f"http://arcbox{path}"]
    if body is not None:
        cmd += ["-H", "content-type: application/json", "--data-binary",
                body if isinstance(body, str) else json.dumps(body)]
    out = run(cmd).stdout
    text, _, code = out.rpartition("\n")
    return int(code), (json.loads(text) if text.strip().startswith(("{", "[")) else text)


def fetch(port, host="127.0.0.1", send=b"", timeout=30):
    with socket.create_connection((host, port), timeout=timeout) as s:
        if send:
            s.sendall(send)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_static_forward_reaches_guest_server(netns, stack_factory, guest_server):
    host_port = free_port()
    stack_factory("--netns", netns, "--configure", *SAFE, "--forward", f"tcp:{host_port}:8000")
    guest_server("sink", 8000)
    reply = fetch(host_port, send=b"hello guest")
    assert reply.decode() == f"{hashlib.sha256(b'hello guest').hexdigest()}:11"


def test_default_source_is_the_gateway(netns, stack_factory, guest_server):
    host_port = free_port()
    stack_factory("--netns", netns, "--configure", *SAFE, "--forward", f"tcp:{host_port}:8001")
    guest_server("peer", 8001)
    assert fetch(host_port).decode().startswith("10.0.2.1:")


def test_api_adds_lists_and_deletes_forwards(netns, stack_factory, guest_server, tmp_path):
    sock = tmp_path / "api.sock"
    stack_factory("--netns", netns, "--configure", *SAFE, "--api", str(sock))
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    guest_server("sink", 8000)
    host_port = free_port()
    code, forward = api(sock, "POST", "/forwards",
                        {"protocol": "tcp", "listen": f"127.0.0.1:{host_port}", "guest": "10.0.2.2:8000"})
    assert code == 201, forward
    assert forward["protocol"] == "tcp" and forward["listen"] == f"127.0.0.1:{host_port}"
    assert forward["guest"] == "10.0.2.2:8000" and forward["id"]
    code, listing = api(sock, "GET", "/forwards")
    assert code == 200 and [f["id"] for f in listing] == [forward["id"]]
    assert fetch(host_port, send=b"x" * 5000).decode().endswith(":5000")

    code, conns = api(sock, "GET", "/connections")
    assert code == 200 and isinstance(conns, list)
    code, stats = api(sock, "GET", "/stats")
    assert code == 200 and stats["frames_in"] > 0 and stats["counters"]["tcp-forward-opened"] == 1
    code, leases = api(sock, "GET", "/leases")
    assert code == 200 and leases == []  # --configure: no DHCP
    code, metrics = api(sock, "GET", "/metrics")
    assert code == 200 and 'arcbox_frames_total{direction="in"}' in metrics
    assert "arcbox_forwards 1.0" in metrics

    code, body = api(sock, "DELETE", f"/forwards/{forward['id']}")
    assert code == 204
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host_port), timeout=5)
    assert api(sock, "GET", "/forwards") == (200, [])


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "bad JSON"),
    ({"protocol": "tcp", "listen": "127.0.0.1:1", "guest": "80", "extra": 1}, 400, "unknown field"),
    ({"protocol": "sctp", "listen": "127.0.0.1:1", "guest": "80"}, 400, "tcp or udp"),
    ({"protocol": "tcp", "listen": "300.0.0.1:9", "guest": "80"}, 400, "not an IP address"),
    ({"protocol": "tcp", "listen": "127.0.0.1:99999", "guest": "80"}, 400, "out of range"),
    ({"protocol": "tcp", "guest": "80"}, 400, "missing field"),
    ([1, 2], 400, "JSON object"),
])
def test_api_rejects_bad_requests(netns, stack_factory, tmp_path, body, status, message):
    sock = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--configure", *SAFE, "--api", str(sock))
    code, reply = api(sock, "POST", "/forwards", body)
    assert code == status and message in reply["error"]
    assert stack.proc.poll() is None


def test_api_conflicts_unknown_paths_and_busy_ports(netns, stack_factory, tmp_path):
    sock = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--configure", *SAFE, "--api", str(sock))
    port = free_port()
    spec = {"protocol": "tcp", "listen": f"127.0.0.1:{port}", "guest": "8000"}
    assert api(sock, "POST", "/forwards", spec)[0] == 201
    code, reply = api(sock, "POST", "/forwards", spec)
    assert code == 409 and "already forwarded" in reply["error"]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        code, reply = api(sock, "POST", "/forwards", {"protocol": "tcp",
                          "listen": f"127.0.0.1:{busy.getsockname()[1]}", "guest": "8000"})
        assert code == 409 and str(busy.getsockname()[1]) in reply["error"]
        assert "in use" in reply["error"]
    finally:
        busy.close()
    assert api(sock, "GET", "/nothing-here")[0] == 404
    assert api(sock, "DELETE", "/forwards/9999")[0] == 404
    assert api(sock, "PUT", "/stats")[0] == 405
    assert stack.proc.poll() is None
    assert api(sock, "GET", "/stats")[0] == 200


def test_busy_port_at_startup_exits_nonzero(netns):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "arcbox-net", "--netns", netns,
                                 "--forward", f"tcp:{port}:80"], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode != 0
        assert f"cannot listen on tcp 127.0.0.1:{port}" in result.stderr
        assert "in use" in result.stderr
    finally:
        busy.close()


def test_guest_refusal_resets_the_host_client(netns, stack_factory):
    host_port = free_port()
    stack_factory("--netns", netns, "--configure", *SAFE, "--forward", f"tcp:{host_port}:8009")
    start = time.monotonic()
    with pytest.raises(ConnectionResetError):  # at connect() or at the first recv()
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as s:
            s.recv(100)
    assert time.monotonic() - start < 5


def test_200mb_through_a_forward_both_ways(netns, stack_factory, guest_server):
    sink_port, source_port = free_port(), free_port()
    stack_factory("--netns", netns, "--configure", *SAFE,
                  "--forward", f"tcp:{sink_port}:8000", "--forward", f"tcp:{source_port}:8001")
    size = 200 * 1024 * 1024
    guest_server("sink", 8000)
    guest_server("source", 8001, size, 21)
    # host -> guest
    h = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", sink_port), timeout=60) as s:
        for chunk in data_chunks(size, 17):
            h.update(chunk)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(1000).decode()
    assert reply == f"{h.hexdigest()}:{size}"
    # guest -> host
    expected = hashlib.sha256()
    for chunk in data_chunks(size, 21):
        expected.update(chunk)
    got = hashlib.sha256()
    n = 0
    with socket.create_connection(("127.0.0.1", source_port), timeout=60) as s:
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got.update(data)
            n += len(data)
    assert n == size and got.hexdigest() == expected.hexdigest()


@pytest.fixture
def client_ns():
    """A second namespace playing a LAN client, on a veth to the host namespace."""
    name = f"abxc-{os.getpid()}"
    host_if, peer_if = f"abxh{os.getpid() % 100000}", f"abxp{os.getpid() % 100000}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if,
             "netns", name])
        run(["ip", "addr", "add", "10.199.0.1/30", "dev", host_if])
        run(["ip", "link", "set", host_if, "up"])
        run(["ip", "-n", name, "addr", "add", "10.199.0.2/30", "dev", peer_if])
        run(["ip", "-n", name, "link", "set", peer_if, "up"])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_forward_source_preserve_shows_the_client_address(netns, stack_factory, guest_server,
                                                         client_ns):
    port = free_port()
    stack_factory("--netns", netns, "--configure", *SAFE, "--forward-source", "preserve",
                  "--forward", f"tcp:10.199.0.1:{port}:8001")
    guest_server("peer", 8001)
    script = ("import socket\n"
              f"s=socket.create_connection(('10.199.0.1',{port}),timeout=10)\n"
              "print(s.getsockname()[1], s.recv(100).decode())\n")
    out = in_ns(client_ns, sys.executable, "-c", script).stdout.split()
    client_port, seen = out[0], out[1]
    assert seen == f"10.199.0.2:{client_port}"


def test_udp_forward_to_guest_echo_server(netns, stack_factory, guest_server, tmp_path):
    host_port = free_port(kind=socket.SOCK_DGRAM)
    sock_path = tmp_path / "api.sock"
    stack_factory("--netns", netns, "--configure", *SAFE, "--forward", f"udp:{host_port}:5353",
                  "--api", str(sock_path))
    guest_server("udpecho", 5353)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for i, c in enumerate(clients):
            c.settimeout(5)
            for n in range(3):
                payload = f"client {i} datagram {n}".encode() * 20
                c.sendto(payload, ("127.0.0.1", host_port))
                data, addr = c.recvfrom(65535)
                assert data == payload and addr == ("127.0.0.1", host_port)
        code, conns = api(sock_path, "GET", "/connections")
        udp_in = [c for c in conns if c["protocol"] == "udp" and c.get("direction") == "inbound"]
        # One flow (one gateway source port) per client.
        assert len(udp_in) == 2
        assert len({c["remote"] for c in udp_in}) == 2
        assert all(c["remote"].startswith("10.0.2.1:") for c in udp_in)
    finally:
        for c in clients:
            c.close()
