"""``--fd N --vnet-hdr``: datagrams of a virtio_net_hdr_v1 and a frame.

A real AF_UNIX socketpair with a memory reactor (the link is driven by hand:
``doRead``), the test playing the VMM on the other end.
"""

import socket

import pytest
from framebuild import DescriptorReactor, RecordingSink

from arcbox_net.config import StackConfig
from arcbox_net.framer import Framer
from arcbox_net.link import open_link
from arcbox_net.link.socket import VnetSocketFrameLink
from arcbox_net.wire import vnet

FRAME = bytes(range(256)) * 5 + bytes(34)  # 1314 bytes, a plausible Ethernet frame


@pytest.fixture
def pair():
    ours, vmm = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    vmm.setblocking(False)
    link = VnetSocketFrameLink(ours, mtu=1500, reactor=DescriptorReactor())
    sink = RecordingSink()
    link.start(sink)
    yield link, vmm, sink
    link.stop()
    vmm.close()


def test_declares_a_v1_header_with_offloads():
    ours, vmm = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    link = VnetSocketFrameLink(ours, mtu=1500, reactor=DescriptorReactor())
    caps = link.capabilities
    assert (caps.vnet_header_len, caps.csum_offload, caps.gso_tcpv4) == (12, True, True)
    assert caps.max_frame == 1514 and "virtio-net" in link.description
    assert Framer(StackConfig(), link).tcp_segment_limit > 60000
    link.stop()
    vmm.close()


def test_frames_read_lose_their_header_and_gso_frames_pass(pair):
    link, vmm, sink = pair
    vmm.send(vnet.zero(12) + FRAME)
    big = bytes(14 + 65000)
    vmm.send(vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16) + big)
    link.doRead()
    assert sink.frames == [FRAME, big]


def test_bad_headers_are_dropped_and_counted(pair):
    link, vmm, sink = pair
    bad = [
        vnet.build(12, 0, 9) + FRAME,                                       # unknown gso_type
        vnet.build(12, 0, vnet.GSO_TCPV4, 5000, 1448) + FRAME,              # hdr_len past the frame
        vnet.build(12, vnet.F_NEEDS_CSUM, 0, 0, 0, 1300, 100) + FRAME,      # csum past the frame
        vnet.zero(12) + bytes(9000),                                        # no GSO, above the MTU
        vnet.zero(12)[:8],                                                  # shorter than a header
    ]
    for datagram in bad:
        vmm.send(datagram)
    vmm.send(vnet.zero(12) + FRAME)
    link.doRead()
    assert sink.frames == [FRAME]
    assert link.drops["bad-vnet-header"] == 3
    assert link.drops["oversize"] == 1 and link.drops["short-vnet-frame"] == 1


def test_frames_sent_carry_the_framers_header_or_a_zero_one(pair):
    link, vmm, _sink = pair
    meta = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    link.send_frame([FRAME[:14], FRAME[14:]], meta)
    link.send_frame(FRAME)
    assert vmm.recv(70000) == meta + FRAME
    assert vmm.recv(70000) == vnet.zero(12) + FRAME


def test_open_link_builds_it_only_for_datagram_fds():
    config = StackConfig()
    ours, vmm = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    link = open_link(config, fd=ours.fileno(), vnet_hdr=True, reactor=DescriptorReactor())
    assert isinstance(link, VnetSocketFrameLink)
    ours.detach()  # the link's socket object owns the fd now
    link.stop()
    vmm.close()
    stream, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ValueError, match="stream socket"):
        open_link(config, fd=stream.fileno(), vnet_hdr=True, reactor=DescriptorReactor())
    with pytest.raises(ValueError, match="goes with --fd"):
        open_link(config, listen_dgram="/nonexistent/x", vnet_hdr=True)
    stream.close()
    other.close()


def test_ipv6_tso_both_ways():
    """TCPv6 GSO is declared (the framer sends 64 KiB v6 segments), and the
    VMM's largest v6 TSO frame -- 64 KiB of payload behind the 40-byte
    header -- is read whole."""
    ours, vmm = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    vmm.setblocking(False)
    vmm.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    link = VnetSocketFrameLink(ours, mtu=1500, reactor=DescriptorReactor())
    sink = RecordingSink()
    link.start(sink)
    try:
        assert link.capabilities.gso_tcpv6
        assert Framer(StackConfig(), link).tcp_segment_limit6 > 60000
        big = bytes(14) + bytes([0x60]) + bytes(39) + bytes(65535)
        vmm.send(vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 74, 1428, 54, 16) + big)
        link.doRead()
        assert sink.frames == [big] and not link.drops
    finally:
        link.stop()
        vmm.close()
