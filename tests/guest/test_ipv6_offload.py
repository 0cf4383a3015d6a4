"""TSO6 on the links that carry virtio-net headers, against a real Linux stack.

A namespace guest over IPv6 (fd00::2, default route via fe80::1) moves 64 MB
each way to a host server on [::1] via fd00::1, at MTU 1500: on the TAP and on
``--fd --vnet-hdr`` (tests/programs/vnet_relay.py, a TAP with IFF_VNET_HDR
behind a socketpair). The data must arrive whole (sha256), and in GSO frames
both ways: far fewer frames than the ~47,000 one-MSS segments each way would
need, i.e. the guest's kernel sends TSO6 frames and takes GSO_TCPV6 ones.
"""

import os
import socket
import subprocess
import sys

import pytest
from conftest import GUEST_CLIENT, guest_tcp_client, in_ns
from hostside import HostServer, sender, sink_then_reply
from tcpclient import data_chunks

from .test_forward_api import api

RELAY = os.path.join(os.path.dirname(GUEST_CLIENT), "vnet_relay.py")
SAFE = ("--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8", "--deny", "::/0", "--allow", "::1/128")
SIZE = 64 * 1024 * 1024
#: One-MSS frames for SIZE bytes at MTU 1500 (MSS 1428 with timestamps) are
#: about 47,000 each way; GSO frames of 64 KiB about 1,000.
FEW_FRAMES = 20000


def _v6_up(ns):
    in_ns(ns, "ip", "link", "set", "tap0", "mtu", "1500", "up")
    in_ns(ns, "ip", "addr", "add", "fd00::2/64", "dev", "tap0", "nodad")
    in_ns(ns, "ip", "-6", "route", "replace", "default", "via", "fe80::1", "dev", "tap0")


def _both_ways(ns, api_sock):
    up = HostServer(sink_then_reply, host="::1")
    down = HostServer(sender(lambda: data_chunks(SIZE, 7)), host="::1")
    try:
        out = guest_tcp_client(ns, "send", "fd00::1", up.port, SIZE, 3, timeout=180)
        up.wait()
        assert not up.errors and up.results[0] == (out["sent_sha256"], SIZE)
        code, before = api(api_sock, "GET", "/stats")
        got = guest_tcp_client(ns, "recv", "fd00::1", down.port, timeout=180)
        down.wait()
        assert got["bytes"] == SIZE and got["sha256"] == down.results[0]
    finally:
        up.close()
        down.close()
    code, after = api(api_sock, "GET", "/stats")
    assert code == 200
    # Guest to host: the frames read during the upload (a few hundred more for
    # the download's ACKs, ND and RAs).
    assert before["frames_in"] < FEW_FRAMES, before
    assert after["frames_out"] - before["frames_out"] < FEW_FRAMES, (before, after)
    assert not after["drops"].get("bad-vnet-header"), after


def test_tap_64mb_each_way_over_ipv6_in_gso_frames(netns, stack_factory, tmp_path):
    api_sock = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--api", str(api_sock), *SAFE)
    _v6_up(netns)
    _both_ways(netns, api_sock)
    assert "Traceback" not in stack.log()


@pytest.fixture
def vnet_guest(netns, stack_factory, tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    relay = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, RELAY, "tap0",
                              str(ours.fileno())],
                             pass_fds=(ours.fileno(),), stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout.readline().strip() == "ready"
        ours.close()
        # Up before the stack's first RA: the relay ends on a write to a TAP that is down.
        in_ns(netns, "ip", "link", "set", "tap0", "up")
        api_sock = tmp_path / "api.sock"
        stack = stack_factory("--fd", str(theirs.fileno()), "--vnet-hdr", "--api", str(api_sock),
                              *SAFE, pass_fds=(theirs.fileno(),))
        theirs.close()
        _v6_up(netns)
        yield netns, api_sock, stack
    finally:
        relay.kill()
        relay.wait(10)


def test_fd_vnet_hdr_64mb_each_way_over_ipv6_in_gso_frames(vnet_guest):
    ns, api_sock, stack = vnet_guest
    _both_ways(ns, api_sock)
    assert "Traceback" not in stack.log()
