"""A real Linux VM (Debian's cloud kernel, virtio-net, busybox) on every VM transport.

Each test boots one guest that does everything in one run (a boot is the
slow part under TCG): DHCP, ping of the gateway, two local DNS names, 16 MB
down (busybox wget from a host HTTP server) and 16 MB up (busybox nc to a
host sink), each checked by sha256, iperf3 each way (the host's binary with
its libraries), and a busybox httpd that the host reaches through a
``--forward`` and checks by sha256. IPv6 from the stack's router
advertisement alone (the guest kernel's accept_ra: SLAAC in fd00::/64, default
route via fe80::1): ping6 of fd00::1 and 1 MB from the host's ``::1`` through
fd00::1 and through 2001:db8::10 (mapped to ``::1``). Then the guest powers off, and
a second VM (a new MAC) gets a lease from the same stack and pings, except on
``--connect-stream``, where the stack ends with its only peer. The host
reaches nothing but loopback: the guest's traffic to the gateway goes to
127.0.0.1 and the stack runs with ``--deny 0.0.0.0/0 --allow 127.0.0.0/8
--deny ::/0 --allow ::1/128``.

The throughput is measured, never asserted: the guest's console marks the
start and end of the download, the host's sink those of the upload, and each
mark samples the time and the stack's CPU (utime+stime from /proc/PID/stat);
``VM_STATS`` lines in the output have MB/s and CPU seconds per GB.
"""

import hashlib
import http.server
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

import vmguest
from conftest import require_root
from hostside import HostServer

SAFE = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8", "--deny", "::/0", "--allow", "::1/128",
        "--map", "2001:db8::10=::1"]
SIZE = 16 * 1024 * 1024
SMALL = 1024 * 1024             # what the guest fetches over IPv6 (kept small: TCG is slow)
#: The SLAAC address of the first VM (MAC 52:54:00:19:00:01, EUI-64) in the stack's fd00::/64.
VM_SLAAC = "fd00::5054:ff:fe19:1"
DNS_RECORD = ("vm.arcbox.internal", "10.0.2.77")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _fail_or_skip(message):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; under CI it may not be skipped")
    pytest.skip(message)


@pytest.fixture(scope="session")
def vm_image():
    """The guest image, built once (and cached across runs, see tests/vmguest.py)."""
    require_root()
    missing = vmguest.missing_tools()
    if missing:
        _fail_or_skip(f"missing {', '.join(missing)} (scripts/setup.sh installs them)")
    try:
        return vmguest.build_image()
    except vmguest.ImageError as e:  # e.g. no Debian mirror within reach
        _fail_or_skip(f"cannot build the VM image: {e}")


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /down: the 16 MB blob; /small: its first MB. GET /gate: answers once the
    test opens the gate."""

    def do_GET(self):
        if self.path in ("/down", "/small"):
            body = self.server.blob if self.path == "/down" else self.server.blob[:SMALL]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/gate":
            opened = self.server.gate.wait(300)
            body = b"open" if opened else b"timeout"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def blob():
    data = random.Random(19).randbytes(SIZE)
    return data, hashlib.sha256(data).hexdigest()


class _Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture
def web(blob):
    """The host's HTTP server on 127.0.0.1 (the guest sees it at 10.0.2.1), and the
    same on [::1] (fd00::1 and 2001:db8::10 to the guest) at ``server.v6.server_address``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.v6 = _Server6(("::1", 0), _Handler)
    servers = (server, server.v6)
    for s in servers:
        s.daemon_threads = True
        s.blob = blob[0]
        s.gate = threading.Event()
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        for s in servers:
            s.gate.set()
            s.shutdown()
            s.server_close()


@pytest.fixture
def marks():
    return Marks()


@pytest.fixture
def sink(marks):
    """The host's upload sink on 127.0.0.1: hashes what it receives, marking start and end."""
    server = host_sink(marks)
    try:
        yield server
    finally:
        server.close()


def host_sink(marks):
    """A HostServer that hashes an upload, marking its start and end in ``marks``."""
    def receive(conn):
        marks.mark("up-start")
        h = hashlib.sha256()
        n = 0
        while data := conn.recv(1 << 20):
            h.update(data)
            n += len(data)
        marks.mark("up-end")
        return h.hexdigest(), n

    return HostServer(receive)


@pytest.fixture
def iperf_server():
    """``iperf3 -s`` on 127.0.0.1 (the guest's 10.0.2.1); its port."""
    if shutil.which("iperf3") is None:
        _fail_or_skip("iperf3 is missing (scripts/setup.sh installs it)")
    port = free_port()
    proc = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def vms(vm_image, tmp_path):
    """Start VMs on the cached image; every one is killed at teardown."""
    started = []

    def start(netdev, script, **kwargs):
        vm = vmguest.VirtualMachine(vm_image, netdev, tmp_path, script,
                                    name=f"vm{len(started)}", **kwargs)
        started.append(vm)
        return vm.start()

    try:
        yield start
    finally:
        for vm in started:
            vm.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


LEASE_AND_PING = """
RECORD=/tmp/lease udhcpc -i eth0 -f -q -n -t 8 -T 2 -s /bin/udhcpc-script >/tmp/udhcpc.log 2>&1
echo "RESULT udhcpc=$?"
while IFS='=' read -r k v; do echo "RESULT lease_$k=$v"; done < /tmp/lease
echo "RESULT ping=$(ping -c 3 -W 2 10.0.2.1 | grep 'packets transmitted')"
"""

FULL = LEASE_AND_PING + """
# IPv6 needs no client: the kernel configures eth0 from the RA (pinged until the
# route and address are there: its solicitation waits for the link-local
# address's duplicate address detection, the global address has its own).
echo "MARK v6-start"
i=0
while [ $i -lt 40 ] && ! ping6 -c 1 -W 1 fd00::1 >/dev/null 2>&1; do sleep 0.5; i=$((i + 1)); done
echo "RESULT v6_waits=$i"
echo "RESULT v6_addr=$(ip -6 addr show dev eth0 | awk '/inet6 fd00:/ {print $2; exit}')"
echo "RESULT v6_route=$(ip -6 route show default | head -1)"
echo "RESULT v6_ping=$(ping6 -c 2 -W 2 fd00::1 | grep 'packets transmitted')"
echo "RESULT v6_gw=$(wget -q -O - 'http://[fd00::1]:{web6}/small' | sha256sum | cut -d' ' -f1)"
echo "RESULT v6_mapped=$(wget -q -O - 'http://[2001:db8::10]:{web6}/small' | sha256sum | cut -d' ' -f1)"
echo "MARK v6-end"
lookup() { nslookup "$1" 10.0.2.1 2>&1 | awk '/^Name:/ {n=1} n && /^Address/ {print $NF; exit}'; }
echo "RESULT dns_host=$(lookup host.arcbox.internal)"
echo "RESULT dns_record=$(lookup {record})"
dd if=/dev/urandom of=/www/blob bs=65536 count={blocks} 2>/dev/null
echo "RESULT blob_sha256=$(sha256sum /www/blob | cut -d' ' -f1)"
# Hashed after the transfer: busybox sha256sum under TCG (~24 MB/s) would bound it.
echo "MARK down-start"
wget -q -O /tmp/down http://10.0.2.1:{web}/down
echo "MARK down-end"
echo "RESULT down_sha256=$(sha256sum /tmp/down | cut -d' ' -f1)"
rm /tmp/down
# nc -e: cat writes the socket itself, with sendfile (nc's own loop writes 1 KiB at a time).
nc 10.0.2.1 {sink} -e cat /www/blob
echo "RESULT up_exit=$?"
# iperf3 (the host's, with its libraries) for figures comparable with the bench's.
echo "MARK iperf-up-start"
iperf3 -c 10.0.2.1 -p {iperf} -t 3 -f m > /tmp/iperf-up 2>&1
echo "MARK iperf-up-end"
echo "RESULT iperf_up=$(grep receiver /tmp/iperf-up | tail -1)"
echo "MARK iperf-down-start"
iperf3 -c 10.0.2.1 -p {iperf} -t 3 -f m -R > /tmp/iperf-down 2>&1
echo "MARK iperf-down-end"
echo "RESULT iperf_down=$(grep receiver /tmp/iperf-down | tail -1)"
httpd -p 80 -h /www
echo "MARK serving"
echo "RESULT gate=$(wget -q -O - http://10.0.2.1:{web}/gate)"
"""


class Marks:
    """Time and stack CPU at each MARK the guest prints, sampled in the console reader."""

    def __init__(self, pid=None):
        self.pid = pid
        self.at = {}

    def __call__(self, line):
        if line.startswith("MARK "):
            self.mark(line[5:].strip())

    def mark(self, name):
        if self.pid is not None:
            try:
                self.at[name] = (time.monotonic(), cpu_seconds(self.pid))
            except OSError:  # the stack is gone: the test's asserts say so
                pass

    def rate(self, start, end, size=SIZE):
        (t0, c0), (t1, c1) = self.at[start], self.at[end]
        return {"MB/s": round(size / (t1 - t0) / 1e6, 1),
                "cpu_s_per_GB": round((c1 - c0) / (size / 1e9), 1)}


def start_full_vm(vms, netdev, web, sink, marks, iperf_port, pass_fds=()):
    """Boot a guest that runs every check (FULL); the VM."""
    script = FULL
    for key, value in {"record": DNS_RECORD[0], "blocks": SIZE // 65536,
                       "web": web.server_address[1], "web6": web.v6.server_address[1],
                       "sink": sink.port,
                       "iperf": iperf_port}.items():
        script = script.replace("{%s}" % key, str(value))
    return vms(netdev, script, mac="52:54:00:19:00:01", pass_fds=pass_fds, on_line=marks,
               programs=("iperf3",))


def iperf_figures(line, marks, name):
    """MB/s and stack CPU s/GB from an iperf3 receiver line and the marks around the run."""
    found = re.search(r"([\d.]+) MBytes\s+([\d.]+) Mbits/sec", line)
    assert found, f"no iperf3 result: {line!r}"
    moved = float(found.group(1)) * 1024 * 1024
    assert moved > 0, f"iperf3 moved nothing: {line!r}"
    (_, c0), (_, c1) = marks.at[f"{name}-start"], marks.at[f"{name}-end"]
    return {"MB/s": round(float(found.group(2)) / 8, 1),
            "cpu_s_per_GB": round((c1 - c0) / (moved / 1e9), 1)}


def check_full_vm(vm, marks, stack, web, sink, blob, fwd_port):
    """Assert every check of FULL, fetch the guest's file through the forward; the figures."""
    vm.wait_for("MARK serving", timeout=180)
    results = vm.results()
    assert results["udhcpc"] == "0", vm.console()
    assert results["lease_ip"] == "10.0.2.2"
    assert results["lease_router"] == "10.0.2.1" and results["lease_dns"] == "10.0.2.1"
    assert "3 packets transmitted, 3 packets received" in results["ping"]
    assert results["v6_addr"] == f"{VM_SLAAC}/64", vm.console()
    assert results["v6_route"].startswith("default via fe80::1 dev eth0"), results["v6_route"]
    assert "2 packets transmitted, 2 packets received" in results["v6_ping"], vm.console()
    small = hashlib.sha256(blob[0][:SMALL]).hexdigest()
    assert results["v6_gw"] == small and results["v6_mapped"] == small, vm.console()
    assert results["dns_host"] == "10.0.2.1"
    assert results["dns_record"] == DNS_RECORD[1]
    assert results["down_sha256"] == blob[1]
    assert results["up_exit"] == "0"
    iperf = {"iperf-up": iperf_figures(results["iperf_up"], marks, "iperf-up"),
             "iperf-down": iperf_figures(results["iperf_down"], marks, "iperf-down")}
    sink.wait()
    assert not sink.errors and sink.results[0] == (results["blob_sha256"], SIZE)

    # Into the guest through the port forward: its httpd serves the blob it made.
    c0, t0 = cpu_seconds(stack.proc.pid), time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{fwd_port}/blob", timeout=120) as r:
        h = hashlib.sha256()
        n = 0
        while chunk := r.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    t1, c1 = time.monotonic(), cpu_seconds(stack.proc.pid)
    assert (h.hexdigest(), n) == (results["blob_sha256"], SIZE)

    web.gate.set()
    assert vm.wait_exit(60) == 0
    results = vm.results()
    assert results["gate"] == "open" and results["exit"] == "0", vm.console()
    return {"ipv6_checks_s": round(marks.at["v6-end"][0] - marks.at["v6-start"][0], 1),
            "down": marks.rate("down-start", "down-end"),
            "up": marks.rate("up-start", "up-end"),
            "forward": {"MB/s": round(SIZE / (t1 - t0) / 1e6, 1),
                        "cpu_s_per_GB": round((c1 - c0) / (SIZE / 1e9), 1)},
            **iperf}


def full_run(stack, vms, netdev, web, sink, marks, blob, fwd_port, iperf_port, pass_fds=()):
    vm = start_full_vm(vms, netdev, web, sink, marks, iperf_port, pass_fds)
    marks.pid = stack.proc.pid
    return check_full_vm(vm, marks, stack, web, sink, blob, fwd_port)


def second_vm(stack, vms, netdev, pass_fds=()):
    """A new VM (a new MAC) on the same stack: a lease of its own and the gateway answers."""
    vm = vms(netdev, LEASE_AND_PING, mac="52:54:00:19:00:02", pass_fds=pass_fds)
    assert vm.wait_exit(90) == 0
    results = vm.results()
    assert results["udhcpc"] == "0", vm.console()
    assert results["lease_ip"] == "10.0.2.3"  # 10.0.2.2 stays the first VM's
    assert results["lease_router"] == "10.0.2.1"
    assert "3 packets transmitted, 3 packets received" in results["ping"], vm.console()
    assert stack.proc.poll() is None, stack.log()


def report(name, stats, capsys):
    with capsys.disabled():
        print(f"\nVM_STATS {name}: {stats}")


def wait_for_log(stack, text, timeout=10):
    deadline = time.monotonic() + timeout
    while text not in stack.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in stack.log()


def stack_args(fwd_port):
    return [*SAFE, "--forward", f"tcp:127.0.0.1:{fwd_port}:10.0.2.2:80",
            "--dns-record", "=".join(DNS_RECORD)]


def test_vm_on_listen_stream(vms, stack_factory, web, sink, marks, blob, iperf_server, tmp_path,
                             capsys):
    sock = tmp_path / "arcbox.sock"
    fwd = free_port()
    stack = stack_factory("--listen-stream", str(sock), *stack_args(fwd))
    stats = full_run(stack, vms, vmguest.stream_client(sock), web, sink, marks, blob, fwd,
                     iperf_server)
    # The VM powered off: the stack noticed and serves the next one.
    wait_for_log(stack, "peer disconnected")
    second_vm(stack, vms, vmguest.stream_client(sock))
    assert "Traceback" not in stack.log()
    report("listen-stream", stats, capsys)


def test_vm_on_listen_dgram(vms, stack_factory, web, sink, marks, blob, iperf_server, tmp_path,
                             capsys):
    sock = tmp_path / "arcbox.sock"
    fwd = free_port()
    stack = stack_factory("--listen-dgram", str(sock), *stack_args(fwd))
    stats = full_run(stack, vms, vmguest.dgram_unix(tmp_path / "vm0.sock", sock),
                     web, sink, marks, blob, fwd, iperf_server)
    second_vm(stack, vms, vmguest.dgram_unix(tmp_path / "vm1.sock", sock))
    log = stack.log()
    # The stack takes the new VM as its peer: "peer changed from vm0 to vm1", or "peer is
    # vm1" when a send in between (a periodic router advertisement) found vm0 gone.
    assert f"to {tmp_path / 'vm1.sock'}" in log or f"peer is {tmp_path / 'vm1.sock'}" in log, log
    assert "Traceback" not in log
    report("listen-dgram", stats, capsys)


def test_vm_on_connect_stream(vms, stack_factory, web, sink, marks, blob, iperf_server, tmp_path,
                             capsys):
    """QEMU listens, the stack connects; the stack's only peer leaving ends it."""
    sock = tmp_path / "qemu.sock"
    fwd = free_port()
    vm = start_full_vm(vms, vmguest.stream_server(sock), web, sink, marks, iperf_server)
    # The guest boots meanwhile; udhcpc retries until the stack is there.
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        assert vm.proc.poll() is None, vm.console()
        time.sleep(0.02)
    stack = stack_factory("--connect-stream", str(sock), *stack_args(fwd))
    marks.pid = stack.proc.pid
    stats = check_full_vm(vm, marks, stack, web, sink, blob, fwd)
    stack.proc.wait(15)
    log = stack.log()
    assert "lost" in log and "Traceback" not in log
    report("connect-stream", stats, capsys)


def test_vm_on_fd_socketpair(vms, stack_factory, web, sink, marks, blob, iperf_server, capsys):
    """A socketpair: one end to the stack's --fd, the other to QEMU by fd number.

    The test keeps QEMU's end open, so after the first VM exits a second QEMU
    inherits the same end: a VMM restarting its guest on the same backend.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        fwd = free_port()
        stack = stack_factory("--fd", str(theirs.fileno()), *stack_args(fwd),
                              pass_fds=(theirs.fileno(),))
        theirs.close()
        fd = ours.fileno()
        stats = full_run(stack, vms, vmguest.dgram_fd(fd), web, sink, marks, blob, fwd,
                         iperf_server, pass_fds=(fd,))
        assert stack.proc.poll() is None, stack.log()
        second_vm(stack, vms, vmguest.dgram_fd(fd), pass_fds=(fd,))
        # The VMM closing its end is the link going away. A datagram socket
        # hears nothing of its peer's close: the stack learns of it on its next
        # send to the guest (ECONNREFUSED), here the SYN of a forwarded connection.
        ours.close()
        try:  # the stack drops this connection (reset or refused) as it exits
            with socket.create_connection(("127.0.0.1", fwd), timeout=5) as c:
                c.recv(1)
        except OSError:
            pass
        stack.proc.wait(15)
        log = stack.log()
        assert "lost" in log and "Traceback" not in log
    finally:
        ours.close()
        theirs.close()
    report("fd", stats, capsys)
