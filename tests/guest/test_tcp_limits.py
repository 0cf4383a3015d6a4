"""Bounded work per guest input, end to end: a namespace's Linux TCP that
announces a tiny MSS (a route's advmss) against the stack in-process."""

import functools
import subprocess

import pytest_twisted
from twisted.internet import threads

from conftest import guest_tcp_client
from hostside import HostServer, sender

from tcpclient import data_chunks  # noqa: E402

guest_client = functools.partial(guest_tcp_client, timeout=120)


@pytest_twisted.inlineCallbacks
def test_a_tiny_guest_mss_gets_48_byte_segments_not_one_frame_per_byte(netns):
    """The guest's SYN announces MSS 1: a 1 MiB download leaves in segments
    of the 48-byte floor (about 22k frames, not a million), none larger than
    the MTU, and arrives byte-exact."""
    from twisted.internet import reactor
    from arcbox_net import NetworkStack, StackConfig
    from arcbox_net.link import open_link

    config = StackConfig(deny=("0.0.0.0/0",), allow=("127.0.0.0/8",))
    link = open_link(config, netns=netns, tap_name="tap0", configure=True, reactor=reactor,
                     offload=False)
    stack = NetworkStack(link, config, reactor=reactor)
    stack.startService()
    subprocess.run(["ip", "netns", "exec", netns, "ip", "route", "add", "10.0.2.1/32", "dev",
                    "tap0", "advmss", "1"], check=True, capture_output=True)
    sizes = []
    send_frame = link.send_frame

    def counting(frame, vnet_header=None):
        sizes.append(len(frame) if isinstance(frame, (bytes, bytearray, memoryview))
                     else sum(len(b) for b in frame))
        if vnet_header is None:
            send_frame(frame)
        else:
            send_frame(frame, vnet_header)

    link.send_frame = counting
    total = 1 << 20
    server = HostServer(sender(lambda: data_chunks(total, 7)))
    try:
        got = yield threads.deferToThread(guest_client, netns, "recv", "10.0.2.1", server.port)
        server.wait()
        assert got["bytes"] == total and got["sha256"] == server.results[0]
        assert max(sizes) == 14 + 20 + 20 + 48  # Ethernet, IPv4, TCP, the MSS floor
        assert total // 48 <= len(sizes) < 2 * total // 48
    finally:
        server.close()
        stack.stopService()
