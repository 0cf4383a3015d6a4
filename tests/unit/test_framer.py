"""The framer: one way out to the guest, chosen from the link's capabilities.

Every frame is read back with dpkt (an independent implementation), and the
checksums are checked the way the guest's kernel checks them.
"""

import struct

import dpkt
import pytest

import framebuild as fb
from arcbox_net.config import StackConfig
from arcbox_net.framer import GSO_TCP_SEGMENT, Framer
from arcbox_net.interfaces import LinkCapabilities
from arcbox_net.wire import icmp, ipv4, vnet
from arcbox_net.wire.checksum import ones_sum, pseudo_header_sum

REMOTE = fb.ip4("203.0.113.10")
GUEST = fb.ip4(fb.GUEST_IP)
OFFLOAD = LinkCapabilities(max_frame=1514, vnet_header_len=vnet.HEADER_LEN,
                           csum_offload=True, gso_tcpv4=True)


class RecordingLink:
    def __init__(self, capabilities):
        self.capabilities = capabilities
        self.sent = []

    def send_frame(self, frame, vnet_header=None):
        data = b"".join(frame) if isinstance(frame, list) else bytes(frame)
        self.sent.append((data, vnet_header))


def framer_for(capabilities, resolved=True):
    link = RecordingLink(capabilities)
    framer = Framer(StackConfig(), link)
    if resolved:
        framer.learn(GUEST, fb.GUEST_MAC)
    return framer, link


def l4_sum_ok(ip):
    """The L4 checksum over pseudo-header + segment is all ones."""
    data = bytes(ip.data)
    return ones_sum(data, pseudo_header_sum(ip.src, ip.dst, ip.p, len(data))) == 0xFFFF


def test_plain_link_gets_full_checksums_and_frames_within_the_mtu():
    framer, link = framer_for(LinkCapabilities.plain(1500))
    assert framer.tcp_segment_limit is None
    framer.send_tcp(REMOTE, GUEST, 80, 40000, 1, 2, 0x18, 512, b"x" * 1460)
    framer.send_tcp(REMOTE, GUEST, 80, 40000, 1, 2, 0x12, 512, b"",
                    options=struct.pack("!BBH", 2, 4, 1460))
    framer.send_udp(fb.ip4(fb.GATEWAY_IP), GUEST, 53, 5353, b"answer")
    assert len(link.sent) == 3
    for frame, meta in link.sent:
        assert meta is None and len(frame) <= 1514
        eth = dpkt.ethernet.Ethernet(frame)
        assert eth.dst == fb.GUEST_MAC and eth.src == fb.GATEWAY_MAC
        assert ones_sum(bytes(eth.data)[:20]) == 0xFFFF
        assert l4_sum_ok(eth.data)
    assert dpkt.ethernet.Ethernet(link.sent[1][0]).data.data.opts == struct.pack("!BBH", 2, 4, 1460)


def test_offload_link_gets_one_gso_frame_with_the_pseudo_header_sum():
    framer, link = framer_for(OFFLOAD)
    assert framer.tcp_segment_limit == GSO_TCP_SEGMENT
    payload = bytes(range(256)) * 40
    framer.send_tcp(REMOTE, GUEST, 80, 40000, 1000, 7, 0x18, 512, payload, segment_size=1448)
    (frame, meta), = link.sent
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet.HEADER.unpack(meta)
    assert (flags, gso_type, gso_size) == (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 1448)
    assert (hdr_len, csum_start, csum_offset) == (14 + 20 + 20, 34, 16)
    ip = dpkt.ethernet.Ethernet(frame).data
    assert ip.len == 20 + 20 + len(payload) and bytes(ip.data.data) == payload
    # What NEEDS_CSUM means: the field holds the folded pseudo-header sum only.
    assert ip.data.sum == pseudo_header_sum(REMOTE, GUEST, 6, 20 + len(payload))


def test_offload_link_segment_within_its_size_is_not_gso_but_still_partial():
    framer, link = framer_for(OFFLOAD)
    framer.send_tcp(REMOTE, GUEST, 80, 40000, 1, 2, 0x10, 512, b"ack", segment_size=1448)
    (_frame, meta), = link.sent
    assert vnet.HEADER.unpack(meta)[:2] == (vnet.F_NEEDS_CSUM, vnet.GSO_NONE)


def test_virtio_1_header_length_is_honoured():
    caps = LinkCapabilities(max_frame=1514, vnet_header_len=vnet.HEADER_V1_LEN,
                            csum_offload=True, gso_tcpv4=True)
    framer, link = framer_for(caps)
    framer.send_tcp(REMOTE, GUEST, 80, 40000, 1, 2, 0x18, 512, b"y" * 5000, segment_size=1448)
    (_frame, meta), = link.sent
    assert len(meta) == 12 and meta[10:] == b"\x01\x00"


def test_a_vnet_link_without_offloads_gets_complete_frames():
    caps = LinkCapabilities(max_frame=1514, vnet_header_len=vnet.HEADER_LEN)
    framer, link = framer_for(caps)
    assert framer.tcp_segment_limit is None
    framer.send_tcp(REMOTE, GUEST, 80, 40000, 1, 2, 0x18, 512, b"z" * 1000, segment_size=1448)
    (frame, meta), = link.sent
    assert meta is None and l4_sum_ok(dpkt.ethernet.Ethernet(frame).data)


@pytest.mark.parametrize("caps", [LinkCapabilities.plain(1500), OFFLOAD])
def test_udp_larger_than_the_mtu_leaves_as_fragments(caps):
    framer, link = framer_for(caps)
    payload = bytes(range(256)) * 12  # 3072 bytes
    framer.send_udp(REMOTE, GUEST, 7, 5000, payload)
    assert len(link.sent) == 3 and framer.counters["udp-fragmented"] == 1
    pieces = []
    for frame, meta in link.sent:
        assert meta is None and len(frame) <= 1514
        ip = dpkt.ethernet.Ethernet(frame).data
        assert ones_sum(bytes(ip)[:20]) == 0xFFFF
        pieces.append((ip.offset * 8, bytes(ip)[20:ip.len]))
    datagram = b"".join(p for _o, p in sorted(pieces))
    assert ones_sum(datagram, pseudo_header_sum(REMOTE, GUEST, 17, len(datagram))) == 0xFFFF
    assert dpkt.udp.UDP(datagram).data == payload


def test_packets_wait_for_the_guest_mac_then_leave_complete():
    framer, link = framer_for(OFFLOAD, resolved=False)
    framer.send_tcp(REMOTE, GUEST, 80, 40000, 1, 2, 0x12, 512, b"",
                    options=struct.pack("!BBH", 2, 4, 1460))
    framer.send_udp(REMOTE, GUEST, 7, 5000, b"hello")
    (arp_frame, _), = link.sent  # one ARP request, not one per packet
    arp = dpkt.ethernet.Ethernet(arp_frame).data
    assert isinstance(arp, dpkt.arp.ARP) and arp.op == 1 and arp.tpa == GUEST
    link.sent.clear()
    framer.learn(GUEST, fb.GUEST_MAC)
    assert len(link.sent) == 2
    for frame, meta in link.sent:
        assert meta is None  # held packets carry full checksums on any link
        eth = dpkt.ethernet.Ethernet(frame)
        assert eth.dst == fb.GUEST_MAC and l4_sum_ok(eth.data)


def test_icmp_errors_quote_the_offending_packet():
    framer, link = framer_for(LinkCapabilities.plain(1500))
    original = fb.udp(5000, 53, b"q" * 20, dst="203.0.113.10")
    ip = ipv4.parse(original, 14)
    quote = ipv4.quote(original, ip)
    assert quote == bytes(original[14:14 + 28])
    framer.send_icmp_error(REMOTE, GUEST, icmp.TYPE_DEST_UNREACH, icmp.CODE_PORT_UNREACH, quote)
    (frame, _), = link.sent
    message = dpkt.ethernet.Ethernet(frame).data.data
    assert (message.type, message.code) == (3, 3)
    assert ones_sum(bytes(message)) == 0xFFFF
    assert bytes(message)[8:] == quote
    with pytest.raises(ValueError):
        icmp.error(icmp.TYPE_ECHO_REPLY, 0, quote)


def test_without_a_link_frames_are_counted_as_dropped():
    framer = Framer(StackConfig())
    framer.learn(GUEST, fb.GUEST_MAC)
    framer.send_udp(REMOTE, GUEST, 7, 5000, b"x")
    assert framer.drops["no-link"] == 1


def test_vnet_header_parse_refuses_impossible_headers():
    ok = vnet.build(10, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    assert vnet.parse(ok, 2000)[1] == vnet.GSO_TCPV4
    from arcbox_net.wire import MalformedFrame
    for bad, size in ((vnet.build(10, 0, 9), 100),
                      (vnet.build(10, vnet.F_NEEDS_CSUM, 0, 0, 0, 90, 16), 100),
                      (vnet.build(10, 0, vnet.GSO_TCPV4, 200, 1448), 100),
                      (b"\x00" * 4, 100)):
        with pytest.raises(MalformedFrame):
            vnet.parse(bad, size)
