"""ICMP echo NAT: identifier rewriting, the handler with fake backends, and
real guests pinging loopback-mapped addresses (raw socket and ping sockets).

Every stack started here runs with ``--deny 0.0.0.0/0 --allow 127.0.0.0/8``
and reaches "remote" hosts only through ``--map`` onto loopback.
"""

import re
import socket

import conftest
import pytest
from conftest import in_ns

SAFE = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8"]

MAP = ["--map", "203.0.113.10=127.0.0.2"]


def _ping(ns, target, count=3, size=None):
    cmd = ["ping", "-c", str(count), "-i", "0.2", "-W", "2", target]
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
