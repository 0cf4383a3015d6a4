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
        whole = isinstance(frame, (bytes, bytearray, memoryview))
        if bytes((frame if whole else frame[0])[12:14]) == b"\x08\x00":   # IPv4 (not RAs)
            sizes.append(len(frame) if whole else sum(len(b) for b in frame))
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


@pytest_twisted.inlineCallbacks
def test_a_connect_flood_fills_the_half_open_cap_and_a_transfer_carries_on(netns):
    """64 guest connects to a host port whose connects hang (a listener with
    a full backlog: the host kernel drops the SYNs). Only --max-half-open (8)
    host connects are started, the other 56 SYNs get RST at once, and a
    download that was established before keeps going to the end."""
    import socket
    import time
    from twisted.internet import reactor
    from arcbox_net import NetworkStack, StackConfig
    from arcbox_net.link import open_link

    config = StackConfig(deny=("0.0.0.0/0",), allow=("127.0.0.0/8",), max_half_open=8)
    link = open_link(config, netns=netns, tap_name="tap0", configure=True, reactor=reactor)
    stack = NetworkStack(link, config, reactor=reactor)
    stack.startService()
    # A listener that never accepts: its backlog fills, then SYNs to it are dropped.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = [socket.create_connection(blackhole.getsockname())]  # the one it holds
    total = 4 << 20

    def slow_chunks():
        for chunk in data_chunks(total, 5, chunk=128 << 10):
            time.sleep(0.05)  # 32 chunks: ~1.6 s, so the flood comes in the middle
            yield chunk

    download = HostServer(sender(slow_chunks))
    try:
        transfer = threads.deferToThread(guest_client, netns, "recv", "10.0.2.1", download.port)
        yield threads.deferToThread(time.sleep, 0.3)
        flood = yield threads.deferToThread(guest_client, netns, "flood", "10.0.2.1",
                                            blackhole.getsockname()[1], 64, 1.0)
        assert flood["refused"] == 56 and flood["pending"] == 8, flood
        assert stack.stats()["drops"]["tcp-half-open-limit"] == 56
        assert stack.tcp.half_open == 8
        got = yield transfer
        download.wait()
        assert got["bytes"] == total and got["sha256"] == download.results[0]
    finally:
        download.close()
        for s in filler:
            s.close()
        blackhole.close()
        stack.stopService()
