"""Micro-benchmarks of the per-frame hot paths (pytest-benchmark, no namespaces).

    ./bench/run.sh --micro        (or .venv/bin/python -m pytest bench/micro)

Not part of the test suite (its testpaths is tests/). Frames are built with
dpkt, never with the code under test.
"""

import socket

import dpkt
import pytest
from zope.interface import implementer

from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.interfaces import IIPv4Handler
from arcbox_net.wire import ipv4, tcp
from arcbox_net.wire.checksum import ones_sum

GUEST_MAC = b"\x02\x11\x22\x33\x44\x55"
GATEWAY_MAC = b"\x02\xab\xcb\x00\x00\x01"
GUEST_IP = socket.inet_aton("10.0.2.2")
HOST_IP = socket.inet_aton("10.0.2.1")
#: A full-size segment at MTU 1500 and the largest an IPv4 packet can carry.
SIZES = {"1500": 1500 - 40, "64KiB": 65535 - 40}
#: Non-zero data: a checksum over zeros would flatter the big-int reduction.
DATA = bytes(range(256)) * 257


def tcp_frame(payload_len):
    seg = dpkt.tcp.TCP(sport=40000, dport=5201, seq=1000, ack=2000, flags=dpkt.tcp.TH_ACK,
                       win=65535, data=DATA[:payload_len])
    ip = dpkt.ip.IP(src=GUEST_IP, dst=HOST_IP, p=6, ttl=64, data=seg)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(dst=GATEWAY_MAC, src=GUEST_MAC, type=0x0800, data=ip))


class FakeLink:
    description = "fake"
    mtu = 65520

    def send_frame(self, frame):
        pass


@implementer(IIPv4Handler)
class NullTcp:
    ip_protocol = 6

    def handle_ipv4(self, frame, ip):
        pass


@pytest.mark.parametrize("size", SIZES)
def test_classify_batch_of_64_frames(benchmark, size):
    """FrameDispatcher.frames_received: Ethernet/IPv4 checks and dispatch to TCP."""
    dispatcher = FrameDispatcher(StackConfig(mtu=65520), FakeLink())
    dispatcher.register(NullTcp())
    frames = [tcp_frame(SIZES[size])] * 64
    dispatcher.frames_received(frames[:1])          # learn the guest MAC first
    benchmark(dispatcher.frames_received, frames)
    assert not dispatcher.drops


@pytest.mark.parametrize("size", SIZES)
def test_tcp_parse(benchmark, size):
    frame = memoryview(tcp_frame(SIZES[size]))
    ip = ipv4.parse(frame, 14)
    seg = benchmark(tcp.parse, frame, ip)
    assert len(seg.payload) == SIZES[size]


@pytest.mark.parametrize("size", SIZES)
def test_tcp_build(benchmark, size):
    payload = DATA[:SIZES[size]]
    head, _payload = benchmark(tcp.build, HOST_IP, GUEST_IP, 5201, 40000, 2000, 1000,
                               tcp.ACK | tcp.PSH, 65535, payload)
    assert len(head) == tcp.HEADER_LEN


@pytest.mark.parametrize("size", SIZES)
def test_ones_sum(benchmark, size):
    benchmark(ones_sum, DATA[:SIZES[size] + 40])


def test_tcp_frame_header_mtu_1500(benchmark):
    """The per-frame header of links without offload: Ethernet+IPv4+TCP, both checksums."""
    payload = memoryview(DATA[:SIZES["1500"]])
    eth = GUEST_MAC + GATEWAY_MAC + b"\x08\x00"
    head = benchmark(tcp.frame_header, eth, HOST_IP, GUEST_IP, 7, 5201, 40000, 2000, 1000,
                     tcp.ACK | tcp.PSH, 65535, payload)
    assert len(head) == tcp.FRAME_HEADER_LEN


def test_tcp_build_header_partial(benchmark):
    """The per-GSO-frame TCP header toward an offloading TAP (pseudo-header sum only)."""
    head = benchmark(tcp.build_header_partial, HOST_IP, GUEST_IP, 5201, 40000, 2000, 1000,
                     tcp.ACK | tcp.PSH, 65535, 65000)
    assert len(head) == tcp.HEADER_LEN
