"""ICMP echo NAT with real guests: namespace guests pinging loopback-mapped
addresses over IPv4 and IPv6 (raw sockets and ping sockets).

Every stack started here runs with ``--deny 0.0.0.0/0 --allow 127.0.0.0/8``
(and ``--deny ::/0 --allow ::1/128``) and reaches "remote" hosts only through
``--map`` onto loopback (2001:db8::10 onto ::1).
"""

import json
import re
import socket
import time

import conftest
import pytest
from conftest import in_ns

SAFE = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8", "--deny", "::/0", "--allow", "::1/128"]

MAP = ["--map", "203.0.113.10=127.0.0.2"]


def _ping(ns, target, count=3, size=None, v6=False):
    cmd = ["ping", *(["-6"] if v6 else []), "-c", str(count), "-i", "0.2", "-W", "2", target]
    if size:
        cmd[1:1] = ["-s", str(size)]
    return in_ns(ns, *cmd, check=False, timeout=30)


def _ping_sockets_allowed_here():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
        return True
    except OSError:
        return False


def test_guest_pings_a_loopback_mapped_address(netns, stack_factory):
    stack = stack_factory("--netns", netns, "--configure", *SAFE, *MAP)
    result = _ping(netns, "203.0.113.10")
    out = result.stdout
    assert "3 packets transmitted, 3 received" in out, out + result.stderr
    replies = re.findall(r"bytes from (\S+): icmp_seq=(\d+) ttl=(\d+)", out)
    assert [(src, seq) for src, seq, _ttl in replies] == \
        [("203.0.113.10", "1"), ("203.0.113.10", "2"), ("203.0.113.10", "3")]
    assert all(ttl == "64" for _s, _q, ttl in replies)     # as the host's kernel sent it
    big = _ping(netns, "203.0.113.10", count=2, size=1400).stdout
    assert "2 packets transmitted, 2 received" in big and "wrong data" not in big
    log = stack.log()
    if _ping_sockets_allowed_here():
        assert "using unprivileged ping sockets" in log
    else:
        lines = [l for l in log.splitlines() if "ping_group_range" in l]
        assert len(lines) == 1 and "using a raw ICMP socket instead" in lines[0], log


def test_guest_pings_to_a_denied_target_get_no_reply(netns, stack_factory):
    stack_factory("--netns", netns, "--configure", *SAFE, *MAP,
                  "--map", "203.0.113.20=127.0.0.3", "--deny", "127.0.0.3/32")
    result = _ping(netns, "203.0.113.20", count=2)
    out = result.stdout
    assert result.returncode != 0
    assert " 0 received" in out and "bytes from" not in out, out
    assert "From 203.0.113.20" in out            # the admin-prohibited error, not silence


@pytest.fixture
def host_netns():
    """A second namespace where the stack itself runs, lo up."""
    with conftest.namespace("abxh") as name:
        yield name


def test_ping_sockets_where_ping_group_range_allows_them(netns, host_netns, stack_factory):
    """The stack runs in a namespace whose ping_group_range admits our gid."""
    in_ns(host_netns, "sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647")
    stack = stack_factory("--netns", netns, "--configure", *SAFE, *MAP,
                          prefix=["ip", "netns", "exec", host_netns])
    result = _ping(netns, "203.0.113.10")
    assert "3 packets transmitted, 3 received" in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("bytes from 203.0.113.10") == 3
    log = stack.log()
    assert "using unprivileged ping sockets" in log and "raw ICMP" not in log, log


def test_ping_socket_class_against_loopback(host_netns, tmp_path):
    """PingSocket on its own, in a namespace with ping_group_range set."""
    in_ns(host_netns, "sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647")
    script = tmp_path / "ping_socket_check.py"
    script.write_text(PING_SOCKET_SCRIPT)
    out = in_ns(host_netns, conftest.sys.executable, str(script), timeout=30).stdout.split()
    assert out[0] == "OK", out
    kernel_id, ttl = int(out[1]), int(out[2])
    assert 0 < kernel_id < 65536 and ttl == 64

PING_SOCKET_SCRIPT = r"""
import select, socket
from arcbox_net.protocols.icmp_nat import PingSocket, echo_fields, with_ident

class Reactor:
    def addReader(self, r): pass
    def removeReader(self, r): pass

replies, errors = [], []
s = PingSocket(Reactor(), "127.0.0.1", lambda m, ttl: replies.append((m, ttl)),
               lambda t, c: errors.append((t, c)))
request = with_ident(bytes((8, 0, 0, 0, 0, 0, 0, 1)) + b"arcbox", 1234)
s.send(request)
select.select([s], [], [], 2)
s.doRead()
message, ttl = replies[0]
mtype, code, ident, seq = echo_fields(message)
assert (mtype, code, seq) == (0, 0, 1) and message[8:] == b"arcbox", (message, errors)
assert ident == s.ident
print("OK", ident, ttl)
s.close()
"""


# -- IPv6

MAP6 = ["--map", "2001:db8::10=::1"]


def _v6_guest(ns):
    """fd00::2 on the guest's TAP (no DAD) and a default route via fe80::1,
    once the link-local address the route's neighbour discovery uses is usable."""
    in_ns(ns, "ip", "-6", "addr", "add", "fd00::2/64", "dev", "tap0", "nodad")
    deadline = time.monotonic() + 10
    while in_ns(ns, "ip", "-6", "addr", "show", "dev", "tap0", "tentative").stdout.strip():
        assert time.monotonic() < deadline, in_ns(ns, "ip", "-6", "addr").stdout
        time.sleep(0.1)
    in_ns(ns, "ip", "-6", "route", "replace", "default", "via", "fe80::1", "dev", "tap0")


def _api_get(path, sock):
    out = conftest.run(["curl", "-sS", "--max-time", "10", "--unix-socket", str(sock),
                        f"http://arcbox{path}"]).stdout
    return json.loads(out)


def test_v6_guest_pings_a_loopback_mapped_address(netns, stack_factory, tmp_path):
    api = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--configure", *SAFE, *MAP6, "--api", str(api))
    _v6_guest(netns)
    result = _ping(netns, "2001:db8::10", v6=True)
    out = result.stdout
    assert "3 packets transmitted, 3 received" in out, out + result.stderr
    replies = re.findall(r"bytes from (\S+): icmp_seq=(\d+) ttl=(\d+)", out)
    assert [(src, seq) for src, seq, _ttl in replies] == \
        [("2001:db8::10", "1"), ("2001:db8::10", "2"), ("2001:db8::10", "3")]
    assert all(ttl == "64" for _s, _q, ttl in replies)     # ::1's hop limit, as received
    [flow] = [f for f in _api_get("/connections", api) if f["protocol"] == "icmp"]
    assert flow["guest"].startswith("fd00::2 id ") and flow["remote"] == "2001:db8::10"
    assert flow["host"].startswith("::1 id ") and flow["state"] == "answered"
    big = _ping(netns, "2001:db8::10", count=2, size=1400, v6=True).stdout
    assert "2 packets transmitted, 2 received" in big and "wrong data" not in big
    # The gateway is the stack itself (Icmpv6Handler), not a flow of the NAT.
    assert "2 received" in _ping(netns, "fd00::1", count=2, v6=True).stdout
    counters = _api_get("/stats", api)["counters"]
    assert counters["icmp-echo-replies"] == 5 and counters["icmpv6-echo-replies"] == 2
    assert "Traceback" not in stack.log()


def test_v6_ping_to_a_denied_target_gets_the_icmpv6_error(netns, stack_factory, tmp_path):
    api = tmp_path / "api.sock"
    stack_factory("--netns", netns, "--configure", *SAFE, *MAP6, "--map", "2001:db8::20=::2",
                  "--api", str(api))
    _v6_guest(netns)
    for target in ("2001:db8::99", "2001:db8::20"):     # unmapped; mapped outside --allow
        result = _ping(netns, target, count=2, v6=True)
        out = result.stdout
        assert result.returncode != 0 and " 0 received" in out and "bytes from" not in out, out
        errors = re.findall(rf"From {re.escape(target)} icmp_seq=(\d) Destination unreachable: "
                            r"Administratively prohibited", out)
        assert errors == ["1", "2"], out          # one error per request, not a timeout
    assert _api_get("/stats", api)["drops"]["icmp-denied"] == 4
    assert [f for f in _api_get("/connections", api) if f["protocol"] == "icmp"] == []


def test_v6_ping_sockets_where_ping_group_range_allows_them(netns, host_netns, stack_factory):
    in_ns(host_netns, "sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647")
    stack = stack_factory("--netns", netns, "--configure", *SAFE, *MAP6,
                          prefix=["ip", "netns", "exec", host_netns])
    _v6_guest(netns)
    result = _ping(netns, "2001:db8::10", v6=True)
    assert "3 packets transmitted, 3 received" in result.stdout, result.stdout + result.stderr
    assert len(re.findall(r"bytes from 2001:db8::10: icmp_seq=\d ttl=64 ", result.stdout)) == 3
    log = stack.log()
    assert "ICMPv6 echo NAT: using unprivileged ping sockets" in log and "raw ICMP" not in log, log


def test_ping_socket_class_against_v6_loopback(host_netns, tmp_path):
    in_ns(host_netns, "sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647")
    script = tmp_path / "ping6_socket_check.py"
    script.write_text(PING6_SOCKET_SCRIPT)
    out = in_ns(host_netns, conftest.sys.executable, str(script), timeout=30).stdout.split()
    assert out[0] == "OK", out
    kernel_id, hop_limit = int(out[1]), int(out[2])
    assert 0 < kernel_id < 65536 and hop_limit == 64

PING6_SOCKET_SCRIPT = r"""
import select
from arcbox_net.protocols.icmp_nat import PingSocket, echo_fields, host_request

class Reactor:
    def addReader(self, r): pass
    def removeReader(self, r): pass

replies, errors = [], []
s = PingSocket(Reactor(), "::1", lambda m, ttl: replies.append((m, ttl)),
               lambda t, c, mtu: errors.append((t, c)))
s.send(host_request(bytes((8, 0, 0, 0, 0, 0, 0, 1)) + b"arcbox6", v6=True, ident=1234))
select.select([s], [], [], 2)
s.doRead()
message, hop_limit = replies[0]
mtype, code, ident, seq = echo_fields(message)
assert (mtype, code, seq) == (129, 0, 1) and message[8:] == b"arcbox6", (message, errors)
assert ident == s.ident
print("OK", ident, hop_limit)
s.close()
"""


@pytest.mark.parametrize("ping_sockets", [False, True], ids=["raw", "ping-sockets"])
def test_v6_host_failures_reach_the_guest_as_icmpv6_errors(netns, host_netns, stack_factory,
                                                           ping_sockets):
    """The stack runs in a namespace with only lo and two routes of its own:
    a prohibit and an unreachable one. Its kernel refuses each (allowed,
    mapped) target at once and the guest hears the ICMPv6 error a router
    would send for it. Nothing can leave that namespace."""
    if ping_sockets:
        in_ns(host_netns, "sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647")
    in_ns(host_netns, "ip", "-6", "route", "add", "prohibit", "2001:db8:ffff:1::/64")
    in_ns(host_netns, "ip", "-6", "route", "add", "unreachable", "2001:db8:ffff:2::/64")
    stack = stack_factory("--netns", netns, "--configure", *SAFE,
                          "--map", "2001:db8::30=2001:db8:ffff::1",
                          "--map", "2001:db8::31=2001:db8:ffff:1::1",
                          "--map", "2001:db8::32=2001:db8:ffff:2::1",
                          "--allow", "2001:db8:ffff::/48",
                          prefix=["ip", "netns", "exec", host_netns])
    _v6_guest(netns)
    for target, error in (("2001:db8::30", "No route"),
                          ("2001:db8::31", "Administratively prohibited"),
                          ("2001:db8::32", "Address unreachable")):
        result = _ping(netns, target, count=2, v6=True)
        out = result.stdout
        assert result.returncode != 0 and "bytes from" not in out, out
        assert re.findall(rf"From {re.escape(target)} icmp_seq=(\d) Destination unreachable: "
                          rf"{error}", out) == ["1", "2"], out
    assert ("ICMPv6 echo NAT: using unprivileged ping sockets" in stack.log()) == ping_sockets
