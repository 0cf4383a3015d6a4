"""The stack's own header builders checked against dpkt and the checksum rules."""

import random

import dpkt

from arcbox_net.wire import ipv4, tcp, udp
from arcbox_net.wire.checksum import checksum, ones_sum

SRC = bytes([10, 0, 2, 1])
DST = bytes([10, 0, 2, 2])


def _naive_sum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum((data[i] << 8) | data[i + 1] for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_ones_sum_matches_the_definition_for_random_buffers():
    rng = random.Random(5)
    for n in list(range(0, 70)) + [1499, 1500, 65535]:
        data = rng.randbytes(n)
        assert ones_sum(data) == _naive_sum(data)
        assert checksum(data) == (~_naive_sum(data)) & 0xFFFF


def test_tcp_segment_checksum_and_fields_agree_with_dpkt():
    payload = bytes(range(256)) * 6
    head, body = tcp.build(SRC, DST, 80, 40000, 2**32 - 5, 77, tcp.ACK | tcp.PSH, 1234,
                           payload, tcp.syn_options(1460, 7))
    packet = dpkt.ip.IP(ipv4.build_header(SRC, DST, 6, len(head) + len(body)) + head + body)
    seg = packet.data
    assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.win) == (80, 40000, 2**32 - 5, 77, 1234)
    assert seg.data == payload
    raw = bytes(packet)
    pseudo = SRC + DST + b"\0\x06" + len(raw[20:]).to_bytes(2, "big")
    assert ones_sum(pseudo + raw[20:]) == 0xFFFF
    assert ones_sum(raw[:20]) == 0xFFFF


def test_frame_header_checksums_and_fields_agree_with_dpkt_and_the_slow_path():
    rng = random.Random(9)
    eth = bytes.fromhex("525400000002" "02abcb000001" "0800")
    payloads = [b"", b"x", b"\xff\xff" * 700, b"\xff" * 1447, bytes(1460)]
    payloads += [rng.randbytes(rng.randrange(1, 1461)) for _ in range(200)]
    payloads += [rng.randbytes(n) for n in (4095, 4096, 4097, 9001, 65495)]
    for payload in payloads:
        seq, ack = rng.getrandbits(32), rng.getrandbits(32)
        flags = rng.choice([tcp.ACK, tcp.ACK | tcp.PSH, tcp.ACK | tcp.FIN, tcp.RST])
        window, ident = rng.getrandbits(16), rng.getrandbits(16)
        head = tcp.frame_header(eth, SRC, DST, ident, 443, 40000, seq, ack, flags, window,
                                payload)
        assert len(head) == tcp.FRAME_HEADER_LEN == 54
        frame = head + payload
        packet = dpkt.ethernet.Ethernet(frame).data
        seg = packet.data
        assert (packet.id, packet.ttl, packet.len) == (ident, 64, 40 + len(payload))
        assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.flags, seg.win) == \
            (443, 40000, seq, ack, flags, window)
        assert seg.data == payload
        assert ones_sum(frame[14:34]) == 0xFFFF
        pseudo = SRC + DST + b"\0\x06" + (20 + len(payload)).to_bytes(2, "big")
        assert ones_sum(pseudo + frame[34:]) == 0xFFFF
        slow_head, _ = tcp.build(SRC, DST, 443, 40000, seq, ack, flags, window, payload)
        assert frame[34:54] == slow_head
        assert frame[14:34] == ipv4.build_header(SRC, DST, 6, 20 + len(payload), ident=ident)


def test_partial_checksum_completes_to_a_valid_one():
    """What a NIC (or the guest kernel) does with a NEEDS_CSUM frame from us."""
    payload = random.Random(1).randbytes(60000)
    head = tcp.build_header_partial(SRC, DST, 443, 50000, 1, 2, tcp.ACK, 512, len(payload))
    segment = bytearray(head + payload)
    segment[16:18] = checksum(bytes(segment)).to_bytes(2, "big")  # sum from csum_start
    pseudo = SRC + DST + b"\0\x06" + len(segment).to_bytes(2, "big")
    assert ones_sum(pseudo + bytes(segment)) == 0xFFFF


def test_udp_build_agrees_with_dpkt():
    data = udp.build(SRC, DST, 53, 33333, b"answer")
    u = dpkt.udp.UDP(data)
    assert (u.sport, u.dport, u.ulen, u.data) == (53, 33333, 14, b"answer")
    pseudo = SRC + DST + b"\0\x11" + len(data).to_bytes(2, "big")
    assert ones_sum(pseudo + data) == 0xFFFF


def test_syn_options_parse_back():
    head, _ = tcp.build(SRC, DST, 1, 2, 100, 0, tcp.SYN, 65535, b"", tcp.syn_options(8960, 9))
    frame = b"\0" * 14 + ipv4.build_header(SRC, DST, 6, len(head)) + head
    seg = tcp.parse(frame, ipv4.parse(frame, 14))
    assert (seg.mss, seg.wscale, seg.flags) == (8960, 9, tcp.SYN)


def test_large_buffers_take_the_numpy_path_with_the_same_result():
    rng = random.Random(9)
    for n in (4097, 4098, 4099, 4100, 9001, 65480, 65535):
        for data in (rng.randbytes(n), b"\xff" * n, b"\0" * n):
            # A view at an odd offset: how payload slices of a frame arrive.
            for view in (data, bytearray(data), memoryview(data), memoryview(b"x" + data)[1:]):
                assert ones_sum(view) == _naive_sum(data)
            assert ones_sum(data, 0xFFFF) == ones_sum(data[:4000] + data[4000:], 0xFFFF)


def test_sack_options_parse_back_and_match_dpkt():
    head, _ = tcp.build(SRC, DST, 1, 2, 100, 0, tcp.SYN, 65535, b"",
                        tcp.syn_options(1460, 7, sack_permitted=True))
    frame = b"\0" * 14 + ipv4.build_header(SRC, DST, 6, len(head)) + head
    seg = tcp.parse(frame, ipv4.parse(frame, 14))
    assert (seg.mss, seg.wscale, seg.sack) == (1460, 7, True)
    assert (dpkt.tcp.TCP_OPT_SACKOK, b"") in dpkt.tcp.parse_opts(dpkt.tcp.TCP(head).opts)
    edges = (1000, 2000, 0xFFFFFF00, 5)  # wraps
    head, _ = tcp.build(SRC, DST, 1, 2, 100, 7, tcp.ACK, 512, b"", tcp.sack_option(edges))
    frame = b"\0" * 14 + ipv4.build_header(SRC, DST, 6, len(head)) + head
    seg = tcp.parse(frame, ipv4.parse(frame, 14))
    assert seg.sack == edges and seg.payload == b""
    opts = dict(dpkt.tcp.parse_opts(dpkt.tcp.TCP(head).opts))
    assert opts[dpkt.tcp.TCP_OPT_SACK] == b"".join(e.to_bytes(4, "big") for e in edges)
    # A segment with other options and no SACK, or a malformed SACK, has none.
    for opts in (b"\x01\x01\x08\x0a" + bytes(8), b"\x01\x01\x05\x0b" + bytes(8)):
        head, _ = tcp.build(SRC, DST, 1, 2, 100, 7, tcp.ACK, 512, b"x", opts)
        frame = b"\0" * 14 + ipv4.build_header(SRC, DST, 6, len(head) + 1) + head + b"x"
        seg = tcp.parse(frame, ipv4.parse(frame, 14))
        assert seg.sack is None and seg.payload == b"x"


def _parse_tcp(head, payload=b""):
    frame = b"\0" * 14 + ipv4.build_header(SRC, DST, 6, len(head) + len(payload)) + head + payload
    return tcp.parse(frame, ipv4.parse(frame, 14))


def test_timestamps_parse_back_and_match_dpkt():
    # Every segment once negotiated: NOP, NOP, TS (the one-unpack path).
    opts = tcp.ts_option(0xFFFFFFF0, 12345)
    assert len(opts) == tcp.TS_OPTION_LEN == 12
    head, _ = tcp.build(SRC, DST, 1, 2, 100, 7, tcp.ACK, 512, b"data", opts)
    seg = _parse_tcp(head, b"data")
    assert (seg.tsval, seg.tsecr, seg.sack, bytes(seg.payload)) == (0xFFFFFFF0, 12345, None,
                                                                     b"data")
    parsed = dict(dpkt.tcp.parse_opts(dpkt.tcp.TCP(head).opts))
    assert parsed[dpkt.tcp.TCP_OPT_TIMESTAMP] == (0xFFFFFFF0).to_bytes(4, "big") + \
        (12345).to_bytes(4, "big")
    # Beside SACK blocks (three fit), and in another layout (TS last): the walk.
    edges = (10, 20, 30, 40, 50, 60)
    head, _ = tcp.build(SRC, DST, 1, 2, 100, 7, tcp.ACK, 512, b"",
                        tcp.sack_option(edges, 77, 88))
    assert len(head) == 60
    seg = _parse_tcp(head)
    assert (seg.tsval, seg.tsecr, seg.sack) == (77, 88, edges)
    head, _ = tcp.build(SRC, DST, 1, 2, 100, 7, tcp.ACK, 512, b"",
                        tcp.sack_option((1, 2)) + b"\x08\x0a" + (5).to_bytes(4, "big")
                        + (6).to_bytes(4, "big") + b"\x01\x00")
    seg = _parse_tcp(head)
    assert (seg.tsval, seg.tsecr, seg.sack) == (5, 6, (1, 2))
    # A segment without the option, or a malformed one, has none.
    for opts in (b"", b"\x01\x01\x08\x09" + bytes(8), b"\x01\x01\x05\x0b" + bytes(8)):
        seg = _parse_tcp(tcp.build(SRC, DST, 1, 2, 100, 7, tcp.ACK, 512, b"", opts)[0])
        assert seg.tsval is None


def test_syn_options_with_timestamps_parse_back_and_match_dpkt():
    for sack in (False, True):
        opts = tcp.syn_options(1460, 7, sack, 0xDEADBEEF, 0)
        assert len(opts) == 20  # Linux's layout: MSS, SACK-permitted/NOPs + TS, NOP + wscale
        head, _ = tcp.build(SRC, DST, 1, 2, 100, 0, tcp.SYN, 65535, b"", opts)
        seg = _parse_tcp(head)
        assert (seg.mss, seg.wscale, seg.sack, seg.tsval, seg.tsecr) == \
            (1460, 7, True if sack else None, 0xDEADBEEF, 0)
        parsed = dict(dpkt.tcp.parse_opts(dpkt.tcp.TCP(head).opts))
        assert parsed[dpkt.tcp.TCP_OPT_TIMESTAMP] == bytes.fromhex("deadbeef00000000")
        assert (dpkt.tcp.TCP_OPT_SACKOK in parsed) is sack


def test_frame_header_with_timestamps_agrees_with_dpkt_and_the_slow_path():
    rng = random.Random(11)
    eth = bytes.fromhex("525400000002" "02abcb000001" "0800")
    for payload in [b"", b"x", b"\xff" * 1447, bytes(1448)] + \
            [rng.randbytes(rng.randrange(1, 1449)) for _ in range(100)]:
        seq, ack = rng.getrandbits(32), rng.getrandbits(32)
        tsval, tsecr = rng.getrandbits(32), rng.choice([0, rng.getrandbits(32), 0xFFFFFFFF])
        opts = tcp.ts_option(tsval, tsecr)
        flags = rng.choice([tcp.ACK, tcp.ACK | tcp.PSH, tcp.ACK | tcp.FIN])
        window, ident = rng.getrandbits(16), rng.getrandbits(16)
        head = tcp.frame_header(eth, SRC, DST, ident, 443, 40000, seq, ack, flags, window,
                                payload, options=opts)
        assert len(head) == 66
        frame = head + payload
        packet = dpkt.ethernet.Ethernet(frame).data
        assert packet.len == 52 + len(payload) and packet.data.data == payload
        assert ones_sum(frame[14:34]) == 0xFFFF
        pseudo = SRC + DST + b"\0\x06" + (32 + len(payload)).to_bytes(2, "big")
        assert ones_sum(pseudo + frame[34:]) == 0xFFFF
        slow_head, _ = tcp.build(SRC, DST, 443, 40000, seq, ack, flags, window, payload, opts)
        assert frame[34:66] == slow_head
