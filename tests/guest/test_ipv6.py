"""IPv6 against real guests (issue 16): a namespace behind a TAP, the Linux
kernel's own IPv6, real clients (dhclient -6, rdisc6, ping, curl, socat).

The guest configures itself from the stack's router advertisements
(``accept_ra=2``, SLAAC in fd00::/64, default route via fe80::1), gets
fd00::2 from DHCPv6, and reaches the host's ``::1`` through the gateway
fd00::1 and through ``2001:db8::10`` (mapped to ``::1``). Every stack runs
with ``--deny ::/0 --allow ::1/128`` beside the IPv4 pair: no packet leaves
this machine. The one host-side interface (the forward-source test) is a
veth pair with addresses from 2001:db8:ffff::/64, removed in a ``finally``.
"""

import errno
import functools
import hashlib
import http.server
import ipaddress
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from conftest import HERE, guest_tcp_client, in_ns, run
from hostside import HostServer, sender, sink_then_reply
from tcpclient import data_chunks

SAFE6 = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8", "--deny", "::/0", "--allow", "::1/128"]
MAPPED = "2001:db8::10"
UNMAPPED = "2001:db8::99"         # denied: never connected to
MAPS = ["--map", f"{MAPPED}=::1"]
TAP = "tap0"
GATEWAY_MAC = bytes.fromhex("02abcb000001")
GUEST_MAC = "02:00:00:00:16:02"   # fixed, so the SLAAC address is known in advance
GUEST_SLAAC = "fd00::ff:fe00:1602"
PREFIX = ipaddress.IPv6Network("fd00::/64")
BIG = 200 * 1024 * 1024
RAWSEND = os.path.join(HERE, "programs", "rawsend.py")
OTHER_MAC = bytes.fromhex("020000001699")

client = functools.partial(guest_tcp_client, timeout=300)


# -- helpers ------------------------------------------------------------------

def wait_for(check, timeout=20.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    return check()


def ip_json(ns, *args):
    out = in_ns(ns, "ip", "-j", *args).stdout.strip()
    return json.loads(out) if out else []


def global_addresses(ns, dev=TAP):
    """The guest's usable (not tentative) global IPv6 addresses on ``dev``: [(address, info)]."""
    found = []
    for link in ip_json(ns, "-6", "addr", "show", "dev", dev):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet6" and info.get("scope") == "global" \
                    and not info.get("tentative"):
                found.append((info["local"], info))
    return found


def bring_up(ns, accept_ra=2, mac=GUEST_MAC, mtu=None):
    """Set the guest NIC up the way a Linux guest does: RAs accepted, EUI-64 addresses.

    The stack creates the TAP up: it is taken down first, so the addresses and
    routes asserted come from the RA that answers this link-up's solicitation."""
    in_ns(ns, "ip", "link", "set", TAP, "down")
    in_ns(ns, "ip", "-6", "addr", "flush", "dev", TAP)
    in_ns(ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{TAP}.accept_ra={accept_ra}",
          f"net.ipv6.conf.{TAP}.addr_gen_mode=0")
    if mac:
        in_ns(ns, "ip", "link", "set", TAP, "address", mac)
    if mtu:
        in_ns(ns, "ip", "link", "set", TAP, "mtu", str(mtu))
    in_ns(ns, "ip", "link", "set", TAP, "up")


def wait_slaac(ns, address=GUEST_SLAAC):
    ok = wait_for(lambda: any(a == address for a, _ in global_addresses(ns)))
    assert ok, in_ns(ns, "ip", "-6", "addr").stdout
    # Link-local too (dhclient -6 and NDP from fe80:: need it out of DAD).
    assert wait_for(lambda: _link_local_ready(ns)), in_ns(ns, "ip", "-6", "addr").stdout


def _link_local_ready(ns):
    for link in ip_json(ns, "-6", "addr", "show", "dev", TAP):
        for info in link.get("addr_info", []):
            if info.get("scope") == "link" and not info.get("tentative"):
                return True
    return False


def need(tool):
    """``tool`` must be installed (scripts/setup.sh does): a skip here, a failure under CI."""
    if shutil.which(tool) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing; scripts/setup.sh should have installed it")
        pytest.skip(f"{tool} is not installed")


def api_get(sock, path):
    out = run(["curl", "-sS", "--max-time", "10", "--unix-socket", str(sock),
               f"http://arcbox{path}"]).stdout
    return json.loads(out)


def drops(sock):
    return api_get(sock, "/stats")["drops"]


def free_port(host="::1", kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET6, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Guest:
    def __init__(self, ns, stack, api):
        self.ns, self.stack, self.api = ns, stack, api


@pytest.fixture
def v6guest(netns, stack_factory, tmp_path):
    """A stack on a TAP in ``netns`` with its API; the guest configured from the RA."""
    api = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--api", str(api), *SAFE6, *MAPS)
    bring_up(netns)
    wait_slaac(netns)
    return Guest(netns, stack, api)


def _no_traceback(stack):
    log = stack.log()
    assert "Traceback" not in log, log
    assert stack.proc.poll() is None, log


# -- the guest configures itself ----------------------------------------------

def test_slaac_default_route_mtu_and_rdnss_from_the_router_advertisement(netns, stack_factory,
                                                                         tmp_path):
    """No client software: the kernel takes the address, route and MTU from the RA."""
    api = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--api", str(api), "--mtu", "1400",
                          "--domain", "example.internal", *SAFE6)
    # The link MTU is left at 1500: the 1400 the kernel ends with can only come from the RA.
    bring_up(netns, mtu=1500)
    wait_slaac(netns)
    found = global_addresses(netns)
    assert len(found) == 1, found
    (address, info), = found
    assert ipaddress.IPv6Address(address) in PREFIX and info["prefixlen"] == 64
    assert info.get("dynamic") is True      # SLAAC (lifetimes from the prefix option)
    assert 0 < info["preferred_life_time"] <= info["valid_life_time"]

    routes = ip_json(netns, "-6", "route", "show", "default")
    assert len(routes) == 1, routes
    route = routes[0]
    assert route["gateway"] == "fe80::1" and route["dev"] == TAP and route["protocol"] == "ra"
    assert 0 < route["expires"] <= 1800, route
    on_link = ip_json(netns, "-6", "route", "show", "fd00::/64")
    assert on_link and on_link[0]["dev"] == TAP, on_link
    assert in_ns(netns, "sysctl", "-n", f"net.ipv6.conf.{TAP}.mtu").stdout.strip() == "1400"

    # The gateway and the router's link-local answer echo; the neighbour entry is a router's.
    for target in ("fd00::1", f"fe80::1%{TAP}"):
        result = in_ns(netns, "ping", "-6", "-c", "3", "-i", "0.3", "-W", "2", target,
                       check=False, timeout=30)
        assert result.returncode == 0 and " 3 received" in result.stdout, result.stdout
    neigh = ip_json(netns, "-6", "neigh", "show", "fd00::1")
    assert neigh and neigh[0]["lladdr"] == "02:ab:cb:00:00:01" and "router" in neigh[0], neigh

    # RDNSS and DNSSL (RFC 8106), as a resolver that reads RAs sees them.
    if shutil.which("rdisc6"):
        ra = in_ns(netns, "rdisc6", "-1", "-w", "2000", TAP, timeout=30).stdout
        assert "Recursive DNS server     : fd00::1" in ra, ra
        assert "DNS search list          : example.internal" in ra, ra
        assert "MTU                      :         1400 bytes" in ra, ra
        assert "Stateful address conf.    :          Yes" in ra, ra   # M flag: DHCPv6 too
        assert "Stateful other conf.      :          Yes" in ra, ra   # O flag
    stats = api_get(api, "/stats")
    assert stats["counters"].get("icmpv6-echo-replies", 0) >= 6, stats
    # The kernel's own traffic was all valid: DAD probes for its addresses, MLD reports,
    # and solicitations close together (two link-ups and rdisc6's) answered by one RA;
    # an answer that met bring_up's link-down is tap-down.
    assert set(stats["drops"]) <= {"ndp-not-ours", "icmpv6-mld", "ndp-rs-rate-limited",
                                   "tap-down"}, stats["drops"]
    _no_traceback(stack)


DHCLIENT_SCRIPT = """#!/bin/sh
# dhclient -6's script for the test: record the lease, apply only the address
# (never the host's /etc/resolv.conf, which a namespace shares). dhclient gives
# its script an environment of its own: the record's path is written in.
env | grep -E '^(reason|new_|interface)' | sort >> "{record}"
case "$reason" in
  BOUND6|RENEW6|REBIND6|REBOOT6)
    ip -6 addr replace "$new_ip6_address/$new_ip6_prefixlen" dev "$interface" nodad ;;
esac
exit 0
"""


def test_dhcpv6_client_gets_the_first_address_and_the_api_lists_it(v6guest, tmp_path):
    need("dhclient")
    ns = v6guest.ns
    script = tmp_path / "dhclient-script"
    record = tmp_path / "dhclient.record"
    script.write_text(DHCLIENT_SCRIPT.replace("{record}", str(record)))
    script.chmod(0o755)
    lease, pid = tmp_path / "dhclient6.leases", tmp_path / "dhclient6.pid"
    base = ["dhclient", "-6", "-lf", str(lease), "-pf", str(pid), "-sf", str(script)]
    try:
        result = in_ns(ns, *base, "-1", "-v", TAP,
                       check=False, timeout=60)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        lines = record.read_text() if record.exists() else ""
        assert "reason=BOUND6" in lines, (lines, result.stderr)
        assert "new_ip6_address=fd00::2" in lines, lines
        assert "new_dhcp6_name_servers=fd00::1" in lines, lines
        assert wait_for(lambda: any(a == "fd00::2" for a, _ in global_addresses(ns)))
        leases = api_get(v6guest.api, "/leases")
        v6 = [entry for entry in leases if ":" in entry["address"]]
        assert len(v6) == 1, leases
        assert v6[0]["address"] == "fd00::2" and v6[0]["mac"] == GUEST_MAC, leases
        # The leased address works: the gateway answers from it.
        result = in_ns(ns, "ping", "-6", "-c", "2", "-i", "0.3", "-W", "2", "-I", "fd00::2",
                       "fd00::1", check=False, timeout=30)
        assert result.returncode == 0, result.stdout
        # Release gives it back (the client's own release, RFC 8415 18.2.7).
        in_ns(ns, *base, "-r", TAP, check=False, timeout=30)
        assert wait_for(lambda: not [e for e in api_get(v6guest.api, "/leases")
                                     if e["address"] == "fd00::2" and e["state"] == "bound"],
                        timeout=10), api_get(v6guest.api, "/leases")
    finally:
        if pid.exists():
            try:
                os.kill(int(pid.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
    _no_traceback(v6guest.stack)


# -- NAT over IPv6 -------------------------------------------------------------

class _Blob(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.blob
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


@pytest.fixture
def web6():
    server = _Server6(("::1", 0), _Blob)
    server.blob = random.Random(16).randbytes(3 * 1024 * 1024)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_ping_and_curl_to_the_host_loopback_via_gateway_and_mapped_address(v6guest, web6,
                                                                          tmp_path):
    ns = v6guest.ns
    result = in_ns(ns, "ping", "-6", "-c", "3", "-i", "0.3", "-W", "2", "fd00::1",
                   check=False, timeout=30)
    assert result.returncode == 0 and " 3 received" in result.stdout, result.stdout
    port = web6.server_address[1]
    want = hashlib.sha256(web6.blob).hexdigest()
    for target in ("fd00::1", MAPPED):
        got = tmp_path / f"got-{target.replace(':', '_')}"
        out = in_ns(ns, "curl", "-sS", "-g", "--max-time", "60", "-o", str(got), "-w",
                    "%{http_code} %{remote_ip} %{local_ip}", f"http://[{target}]:{port}/blob").stdout
        assert out == f"200 {target} {GUEST_SLAAC}", out
        assert hashlib.sha256(got.read_bytes()).hexdigest() == want
    _no_traceback(v6guest.stack)


@pytest.mark.parametrize("target", ["fd00::1", MAPPED])
def test_200mb_host_to_guest_over_ipv6_sha256(v6guest, target, capsys):
    server = HostServer(sender(lambda: data_chunks(BIG, 16)), host="::1")
    try:
        start = time.monotonic()
        out = client(v6guest.ns, "recv", target, server.port)
        seconds = time.monotonic() - start
        server.wait()
        assert not server.errors, server.errors
        assert out["bytes"] == BIG
        assert out["sha256"] == server.results[0]
    finally:
        server.close()
    with capsys.disabled():
        print(f"\nIPV6_BULK down via {target}: {BIG / seconds / 1e6:.1f} MB/s ({seconds:.1f} s)")
    _no_traceback(v6guest.stack)


@pytest.mark.parametrize("target", ["fd00::1", MAPPED])
def test_200mb_guest_to_host_over_ipv6_sha256(v6guest, target, capsys):
    server = HostServer(sink_then_reply, host="::1")
    try:
        start = time.monotonic()
        out = client(v6guest.ns, "send", target, server.port, BIG, 61)
        seconds = time.monotonic() - start
        server.wait()
        assert not server.errors, server.errors
        host_sha, host_n = server.results[0]
        assert host_n == BIG and host_sha == out["sent_sha256"]
        assert out["reply"] == f"{host_sha}:{BIG}"
    finally:
        server.close()
    with capsys.disabled():
        print(f"\nIPV6_BULK up via {target}: {BIG / seconds / 1e6:.1f} MB/s ({seconds:.1f} s)")
    _no_traceback(v6guest.stack)


def test_jumbo_mtu_bulk_both_ways_and_a_privacy_address(netns, stack_factory, tmp_path,
                                                        capsys):
    """At MTU 65520 (the slirp4netns/rootlesskit setting) 64 MB each way over IPv6, from
    an RFC 8981 temporary address the guest made itself: the stack takes a new source
    in the prefix from the guest's MAC without being told."""
    api = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--api", str(api), "--mtu", "65520", *SAFE6, *MAPS)
    in_ns(netns, "sysctl", "-q", "-w", f"net.ipv6.conf.{TAP}.use_tempaddr=2")
    bring_up(netns, mtu=65520)
    wait_slaac(netns)
    temporary = wait_for(lambda: [a for a, info in global_addresses(netns)
                                  if info.get("temporary")])
    assert temporary and temporary[0] != GUEST_SLAAC, global_addresses(netns)
    size = 64 * 1024 * 1024
    down = HostServer(sender(lambda: data_chunks(size, 3)), host="::1")
    up = HostServer(sink_then_reply, host="::1")
    try:
        start = time.monotonic()
        got = client(netns, "recv", "fd00::1", down.port)
        mid = time.monotonic()
        sent = client(netns, "send", MAPPED, up.port, size, 4)
        end = time.monotonic()
        down.wait()
        up.wait()
        assert got["bytes"] == size and got["sha256"] == down.results[0]
        assert up.results[0] == (sent["sent_sha256"], size)
    finally:
        down.close()
        up.close()
    with capsys.disabled():
        print(f"\nIPV6_BULK mtu 65520: down {size / (mid - start) / 1e6:.1f} MB/s, "
              f"up {size / (end - mid) / 1e6:.1f} MB/s")
    # The guest's kernel spoke from its temporary address (preferred with use_tempaddr=2),
    # and the stack learned it as the guest MAC's.
    neighbours = api_get(api, "/stats")["neighbours"]
    assert neighbours.get(temporary[0]) == GUEST_MAC, neighbours
    _no_traceback(stack)


def _udp6_echo():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    peers = []

    def serve():
        while True:
            try:
                data, peer = s.recvfrom(65535)
            except OSError:
                return
            peers.append(peer)
            s.sendto(b"echo:" + data, peer)
    threading.Thread(target=serve, daemon=True).start()
    return s, peers


def test_udp6_echo_via_gateway_and_mapped_address(v6guest):
    need("socat")
    s, peers = _udp6_echo()
    port = s.getsockname()[1]
    try:
        for target in ("fd00::1", MAPPED):
            # A datagram bigger than the IPv6 minimum MTU too: one frame each way at 1500.
            for payload in (f"hello {target}", "x" * 1400):
                result = in_ns(v6guest.ns, "socat", "-T", "3", "-",
                               f"UDP6:[{target}]:{port}", input=payload, timeout=30)
                assert result.stdout == "echo:" + payload, result
        assert peers and all(p[0] == "::1" for p in peers), peers
    finally:
        s.close()
    _no_traceback(v6guest.stack)


def test_refused_v6_port_fails_fast_with_a_reset(v6guest):
    port = free_port()      # nothing listens on [::1]:port
    for target in ("fd00::1", MAPPED):
        out = client(v6guest.ns, "connect", target, port)
        assert out["errno"] == errno.ECONNREFUSED, out
        # A refusal, not the client's 30 s timeout (the RST arrives at once).
        assert out["seconds"] < 10, out
    _no_traceback(v6guest.stack)


def test_denied_v6_destination_gets_the_icmpv6_error_and_is_counted(v6guest):
    before = api_get(v6guest.api, "/stats")
    out = client(v6guest.ns, "connect", UNMAPPED, 80)
    # ICMPv6 destination unreachable, administratively prohibited: EACCES in Linux.
    assert out["errno"] == errno.EACCES, out
    assert out["seconds"] < 10, out
    after = api_get(v6guest.api, "/stats")

    def denied(stats):
        return stats["drops"].get("tcp-denied", 0) + stats["counters"].get("tcp-denied", 0)
    assert denied(after) > denied(before), (before, after)
    # UDP to it too: the guest's socket hears the same error on its next call.
    probe = ("import socket,sys\n"
             "s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);s.settimeout(5)\n"
             f"s.connect(('{UNMAPPED}',53))\n"
             "s.send(b'x')\n"
             "try:\n s.recv(10);print('reply')\n"
             "except OSError as e:print(type(e).__name__, e.errno)\n")
    result = in_ns(v6guest.ns, sys.executable, "-c", probe, timeout=30).stdout.split()
    # EACCES: administratively prohibited, as for TCP (a timeout would mean silence).
    assert result == ["PermissionError", str(errno.EACCES)], result
    _no_traceback(v6guest.stack)


# -- port forwards into the guest's IPv6 address ------------------------------

def _peer_via(host, port, source=None):
    with socket.create_connection((host, port), timeout=20, source_address=source) as c:
        data = b""
        while chunk := c.recv(1024):
            data += chunk
    return data.decode()


def test_forward_on_host_loopback_into_the_guest_v6_address(netns, stack_factory, tmp_path,
                                                            guest_server):
    fwd, bulk, udp = free_port(), free_port(), free_port(kind=socket.SOCK_DGRAM)
    stack = stack_factory("--netns", netns, *SAFE6,
                          "--forward", f"tcp:[::1]:{fwd}:[{GUEST_SLAAC}]:80",
                          "--forward", f"tcp:[::1]:{bulk}:[{GUEST_SLAAC}]:81",
                          "--forward", f"udp:[::1]:{udp}:[{GUEST_SLAAC}]:5353")
    bring_up(netns)
    wait_slaac(netns)
    guest_server("peer", 80)
    guest_server("sink", 81)
    guest_server("udpecho", 5353)
    # A loopback client: the guest sees the gateway (fd00::1), whose replies come back to us.
    peer = _peer_via("::1", fwd)
    assert peer.rpartition(":")[0] == "fd00::1", peer
    # Bulk into the guest through it: 32 MB the guest hashes and reports.
    h = hashlib.sha256()
    with socket.create_connection(("::1", bulk), timeout=60) as c:
        for chunk in data_chunks(32 * 1024 * 1024, 5):
            h.update(chunk)
            c.sendall(chunk)
        c.shutdown(socket.SHUT_WR)
        reply = b""
        while data := c.recv(4096):
            reply += data
    assert reply.decode() == f"{h.hexdigest()}:{32 * 1024 * 1024}"
    # UDP through a forward too: the guest's echo comes back to the host client.
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"ping over v6", ("::1", udp))
        assert u.recvfrom(2048)[0] == b"ping over v6"
    _no_traceback(stack)


@pytest.fixture
def host_veth6():
    """A veth pair in the HOST namespace, one end with 2001:db8:ffff::1 and ::2 (no DAD):
    non-loopback IPv6 addresses of this host that lead nowhere off it (the pair's
    other end is its only neighbour). Deleting one end removes both."""
    name = f"abx6v{os.getpid() % 100000}"
    run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"])
    try:
        for address in ("2001:db8:ffff::1/64", "2001:db8:ffff::2/64"):
            run(["ip", "-6", "addr", "add", address, "dev", name, "nodad"])
        run(["ip", "link", "set", name + "p", "up"])
        run(["ip", "link", "set", name, "up"])
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def test_forward_source_preserve_shows_the_real_v6_client(netns, stack_factory, guest_server,
                                                         host_veth6):
    fwd = free_port("2001:db8:ffff::1")
    stack = stack_factory("--netns", netns, *SAFE6, "--forward-source", "preserve",
                          "--forward", f"tcp:[2001:db8:ffff::1]:{fwd}:[{GUEST_SLAAC}]:80")
    bring_up(netns)
    wait_slaac(netns)
    guest_server("peer", 80)
    peer = _peer_via("2001:db8:ffff::1", fwd, source=("2001:db8:ffff::2", 0))
    # The guest answered 2001:db8:ffff::2 through its default route (fe80::1).
    assert peer.rpartition(":")[0] == "2001:db8:ffff::2", peer
    _no_traceback(stack)


def test_guest_nic_down_drops_frames_to_it_and_the_stack_stays(netns, stack_factory, tmp_path):
    """A TAP whose interface is down refuses writes (EIO): a guest that takes its
    NIC down for a while (a container restarting its network) must not end the
    stack at the next router advertisement or forwarded connection."""
    api = tmp_path / "api.sock"
    fwd = free_port()
    stack = stack_factory("--netns", netns, "--api", str(api), *SAFE6,
                          "--forward", f"tcp:[::1]:{fwd}:[{GUEST_SLAAC}]:80")
    bring_up(netns)
    wait_slaac(netns)
    in_ns(netns, "ip", "link", "set", TAP, "down")
    # A host client of the forward makes the stack write to the guest at once (NS or SYN).
    with socket.socket(socket.AF_INET6) as c:
        c.settimeout(3)
        try:
            c.connect(("::1", fwd))
            c.recv(1)
        except OSError:
            pass
    assert wait_for(lambda: drops(api).get("tap-down", 0) >= 1, timeout=10), drops(api)
    assert stack.proc.poll() is None, stack.log()
    # Up again: the guest configures itself and reaches the host as before.
    bring_up(netns)
    wait_slaac(netns)
    result = in_ns(netns, "ping", "-6", "-c", "2", "-i", "0.3", "-W", "2", "fd00::1",
                   check=False, timeout=20)
    assert result.returncode == 0, result.stdout
    _no_traceback(stack)


# -- --no-ipv6 -----------------------------------------------------------------

def test_no_ipv6_sends_no_ra_and_counts_the_guest_frames(netns, stack_factory, tmp_path):
    api = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--api", str(api), "--no-ipv6", *SAFE6)
    bring_up(netns)
    # Well past the RS the kernel sends on link-up and its answer, were there one.
    assert _link_local_ready(netns) or wait_for(lambda: _link_local_ready(netns))
    in_ns(netns, "ping", "-6", "-c", "2", "-i", "0.5", "-W", "1", "fd00::1", check=False,
          timeout=20)
    time.sleep(5)
    assert global_addresses(netns) == [], in_ns(netns, "ip", "-6", "addr").stdout
    assert ip_json(netns, "-6", "route", "show", "default") == []
    stats = api_get(api, "/stats")
    assert stats["drops"].get("ipv6-disabled", 0) >= 2, stats    # RS, DAD, MLD, the NS for fd00::1
    assert stats["counters"].get("ra-sent", 0) == 0, stats
    _no_traceback(stack)


# -- hostile IPv6 frames from the guest ----------------------------------------

def _sum16(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _upper_csum(src, dst, nh, message):
    pseudo = src + dst + struct.pack("!IxxxB", len(message), nh)
    return (~_sum16(pseudo + message)) & 0xFFFF


def _icmp6(kind, code, body, src, dst):
    message = struct.pack("!BBH", kind, code, 0) + body
    c = _upper_csum(src, dst, 58, message)
    return message[:2] + struct.pack("!H", c) + message[4:]


def _ip6(src, dst, nh, payload, hop_limit=64, payload_len=None):
    length = len(payload) if payload_len is None else payload_len
    return struct.pack("!IHBB", 6 << 28, length, nh, hop_limit) + src + dst + payload


def _eth(mac, packet, dst=GATEWAY_MAC):
    return dst + mac + b"\x86\xdd" + packet


def _a(text):
    return ipaddress.IPv6Address(text).packed


def _ext(nh, body=b"\x01\x04\0\0\0\0"):
    """An 8-byte extension header (hop-by-hop / destination options: PadN)."""
    return bytes([nh, 0]) + body


def _tcp_syn(src, dst, sport=40002, dport=80):
    syn = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 2, 65535, 0, 0)
    c = _upper_csum(src, dst, 6, syn)
    return syn[:16] + struct.pack("!H", c) + syn[18:]


def hostile_frames(mac, src):
    """(reason, frames): what a broken or hostile guest writes, each kind once."""
    gw, lladdr = _a("fd00::1"), _a("fe80::1")
    ll_src = _a("fe80::ff:fe00:1602")
    syn = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 2, 65535, 0, 0)
    udp = struct.pack("!HHHH", 40000, 9, 12, 0) + b"junk"
    kinds = {
        "bad option length": _eth(mac, _ip6(src, gw, 60, bytes([6, 0, 1, 200]) + bytes(4) + syn)),
        "extension past the payload": _eth(mac, _ip6(src, gw, 0, bytes([6, 4]) + bytes(6) + syn)),
        "payload length beyond the frame": _eth(mac, _ip6(src, gw, 6, syn, payload_len=1400)),
        "payload length inside the TCP header": _eth(mac, _ip6(src, gw, 6, syn, payload_len=8)),
        "short header": _eth(mac, _ip6(src, gw, 6, b"")[:30]),
        "hop-by-hop after another header": _eth(mac, _ip6(src, gw, 60, _ext(0) + _ext(6) + syn)),
        "nine extension headers": _eth(mac, _ip6(src, gw, 60, b"".join(_ext(60) for _ in range(8))
                                                 + _ext(6) + syn)),
        "source-routed": _eth(mac, _ip6(src, gw, 43, bytes([6, 0, 0, 1]) + bytes(4) + syn)),
        "fragment": _eth(mac, _ip6(src, gw, 44, bytes([17, 0, 0, 1]) + b"\0\0\0\x07" + udp)),
        "jumbogram option": _eth(mac, _ip6(src, gw, 0, bytes([6, 0, 0xC2, 4]) + bytes(4) + syn)),
        "unknown protocol": _eth(mac, _ip6(src, gw, 253, bytes(16))),
        "RA from the guest": _eth(mac, _ip6(ll_src, _a("ff02::1"), 58, _icmp6(
            134, 0, bytes([64, 0]) + struct.pack("!HII", 1800, 0, 0), ll_src, _a("ff02::1")),
            hop_limit=255), dst=bytes.fromhex("333300000001")),
        "NA claiming fd00::1": _eth(mac, _ip6(ll_src, _a("ff02::1"), 58, _icmp6(
            136, 0, struct.pack("!I", 0x20000000) + gw + bytes([2, 1]) + mac, ll_src,
            _a("ff02::1")), hop_limit=255), dst=bytes.fromhex("333300000001")),
        # Sources that are not this MAC's: outside the guest prefixes, and the guest's own
        # address sent from a second MAC (in-prefix addresses are claimable, as SLAAC needs).
        "NS for fd00::1 from a spoofed source": _eth(mac, _ip6(_a("2001:db8::5"), gw, 58, _icmp6(
            135, 0, bytes(4) + gw + bytes([1, 1]) + mac, _a("2001:db8::5"), gw), hop_limit=255)),
        "NS for fd00::1 from the guest's address, another MAC": _eth(OTHER_MAC, _ip6(src, gw, 58,
            _icmp6(135, 0, bytes(4) + gw + bytes([1, 1]) + OTHER_MAC, src, gw),
            hop_limit=255)),
        "NS for fe80::1 with a bad checksum": _eth(mac, _ip6(ll_src, lladdr, 58, _icmp6(
            135, 0, bytes(4) + lladdr, ll_src, lladdr)[:2] + b"\xde\xad" + bytes(4) + lladdr,
            hop_limit=255)),
        "NS with hop limit 64": _eth(mac, _ip6(ll_src, lladdr, 58, _icmp6(
            135, 0, bytes(4) + lladdr, ll_src, lladdr), hop_limit=64)),
        "ICMPv6 error from the guest": _eth(mac, _ip6(src, gw, 58, _icmp6(
            1, 4, bytes(4) + _ip6(gw, src, 17, udp), src, gw))),
        "TCP to a multicast group": _eth(mac, _ip6(src, _a("ff02::1"), 6, syn),
                                         dst=bytes.fromhex("333300000001")),
        # Never on the wire (RFC 4291 2.5.5.2): not a way to the host's IPv4 loopback.
        "SYN to ::ffff:127.0.0.1": _eth(mac, _ip6(src, _a("::ffff:127.0.0.1"), 6,
                                                  _tcp_syn(src, _a("::ffff:127.0.0.1")))),
        "SYN to ::": _eth(mac, _ip6(src, bytes(16), 6, _tcp_syn(src, bytes(16)))),
    }
    return kinds


def tx_dropped(ns):
    """Frames the guest's kernel dropped on the TAP (its queue to the stack was full)."""
    (link,) = ip_json(ns, "-s", "link", "show", TAP)
    return link["stats64"]["tx"]["dropped"]


def test_hostile_ipv6_frames_and_floods_leave_the_stack_serving(v6guest, web6, capsys):
    ns, api = v6guest.ns, v6guest.api
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    src = _a(GUEST_SLAAC)
    frames = hostile_frames(mac, src)
    before, tx_before = api_get(api, "/stats"), tx_dropped(ns)
    # Every kind 50 times (paced: all of them reach the stack), then RA, NA and spoofed-NS
    # floods of 3000 each as fast as one socket writes: what the TAP's queue cannot hold
    # the kernel drops (and counts) before the stack sees it.
    in_ns(ns, sys.executable, RAWSEND, TAP, "50", "0.005", *(f.hex() for f in frames.values()),
          timeout=120)
    floods = [frames["RA from the guest"], frames["NA claiming fd00::1"],
              frames["NS for fd00::1 from a spoofed source"]]
    in_ns(ns, sys.executable, RAWSEND, TAP, "3000", "0", *(f.hex() for f in floods), timeout=120)
    time.sleep(0.5)
    after = api_get(api, "/stats")
    _no_traceback(v6guest.stack)
    # The gateway's neighbour entry in the guest is still the stack's MAC, routes unchanged.
    route = ip_json(ns, "-6", "route", "show", "default")
    assert route and route[0]["gateway"] == "fe80::1", route
    # Still serving: curl over IPv6 through the gateway, ping, NDP.
    port = web6.server_address[1]
    out = in_ns(ns, "curl", "-sS", "-g", "--max-time", "30", "-o", "/dev/null", "-w",
                "%{http_code} %{size_download}", f"http://[fd00::1]:{port}/blob").stdout
    assert out == f"200 {len(web6.blob)}", out
    result = in_ns(ns, "ping", "-6", "-c", "2", "-i", "0.3", "-W", "2", "fd00::1",
                   check=False, timeout=20)
    assert result.returncode == 0, result.stdout

    grown = {reason: n - before["drops"].get(reason, 0) for reason, n in after["drops"].items()
             if n > before["drops"].get(reason, 0)}
    total = sum(grown.values())
    sent = 50 * len(frames) + 3000 * len(floods)
    kernel_dropped = tx_dropped(ns) - tx_before
    # Every hostile frame was dropped and counted: by the stack, or by the kernel for a
    # full TAP queue (the guest's own few NDP and MLD frames are counted too).
    assert total + kernel_dropped >= sent, (sent, kernel_dropped, grown)
    with capsys.disabled():
        print(f"\nIPV6_HOSTILE sent {sent}: counted by the stack {total}, "
              f"dropped by the guest kernel's TAP queue {kernel_dropped}")
    for reason in ("ipv6-bad-option", "truncated-ipv6-extension", "truncated-ipv6", "short-ipv6",
                   "ipv6-misplaced-hop-by-hop", "ipv6-too-many-extensions",
                   "ipv6-source-routed", "ipv6-fragment", "ipv6-jumbogram",
                   "ndp-guest-router", "ndp-address-conflict", "ndp-bad-checksum",
                   "ndp-bad-hop-limit", "icmpv6-error-from-guest", "multicast"):
        assert grown.get(reason, 0) >= 50, (reason, grown)
    assert grown.get("spoofed-source", 0) >= 100, grown
    assert grown.get("tcp-martian", 0) >= 100, grown
    # Nothing answered the spoofed solicitation or the floods beyond the guest's own NDP.
    assert after["counters"].get("ndp-replies", 0) - before["counters"].get("ndp-replies", 0) \
        < 50, (before["counters"], after["counters"])
