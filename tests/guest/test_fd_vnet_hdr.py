"""``--fd N --vnet-hdr`` against a real Linux stack: the namespace's kernel behind
a TAP with IFF_VNET_HDR, its frames relayed with their virtio_net_hdr_v1 over a
socketpair (tests/programs/vnet_relay.py), so TSO frames and partial checksums
cross the socket both ways, as from a VMM that speaks virtio-net.
"""

import os
import socket
import subprocess
import sys

import pytest
from conftest import GUEST_CLIENT, guest_tcp_client, in_ns, udhcpc
from hostside import HostServer, sender, sink_then_reply
from tcpclient import data_chunks

from .test_forward_api import api

RELAY = os.path.join(os.path.dirname(GUEST_CLIENT), "vnet_relay.py")

SAFE = ("--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8", "--map", "203.0.113.10=127.0.0.2")


@pytest.fixture
def vnet_guest(netns, stack_factory, tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    relay = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable,
                              RELAY, "tap0",
                              str(ours.fileno())],
                             pass_fds=(ours.fileno(),), stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout.readline().strip() == "ready"
        ours.close()
        in_ns(netns, "ip", "link", "set", "tap0", "up")
        api_sock = tmp_path / "api.sock"
        stack_factory("--fd", str(theirs.fileno()), "--vnet-hdr", "--api", str(api_sock),
                      *SAFE, pass_fds=(theirs.fileno(),))
        theirs.close()
        lease = udhcpc(netns, str(tmp_path / "lease"))
        yield netns, api_sock, lease
    finally:
        relay.kill()
        relay.wait(10)


def test_lease_ping_and_64k_frames_both_ways(vnet_guest):
    ns, api_sock, lease = vnet_guest
    assert lease["ip"] == "10.0.2.2" and lease["router"] == "10.0.2.1"
    in_ns(ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.1")

    size = 64 * 1024 * 1024
    up = HostServer(sink_then_reply)
    down = HostServer(sender(lambda: data_chunks(size, 5)), host="127.0.0.2")
    try:
        out = guest_tcp_client(ns, "send", "10.0.2.1", up.port, size, 3, timeout=180)
        up.wait()
        assert not up.errors and up.results[0] == (out["sent_sha256"], size)
        got = guest_tcp_client(ns, "recv", "203.0.113.10", down.port, timeout=180)
        down.wait()
        assert got["bytes"] == size and got["sha256"] == down.results[0]
    finally:
        up.close()
        down.close()
    # The 64 MB each way went as GSO frames, not 1500-byte ones: far fewer frames
    # than MSS-sized segments would need (about 46,000 each way).
    code, stats = api(api_sock, "GET", "/stats")
    assert code == 200
    assert stats["frames_in"] < 20000 and stats["frames_out"] < 20000, stats
    assert stats["drops"].get("bad-vnet-header", 0) == 0
