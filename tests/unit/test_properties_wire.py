"""Properties of the wire parsers (arcbox_net/wire): what is built parses back
to the same values with valid checksums, and arbitrary bytes either parse
into a view that stays inside the frame or raise MalformedFrame, never any
other exception (a guest controls every byte)."""

import array
import struct
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from arcbox_net.wire import MalformedFrame, dnsname, ethernet, icmp, ipv4, tcp, udp, vnet
from arcbox_net.wire import vhost_user as vu

FAST = settings(max_examples=100, deadline=None)

addresses = st.binary(min_size=4, max_size=4)
macs = st.binary(min_size=6, max_size=6)
ports = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
buffers = st.sampled_from([bytes, bytearray, memoryview])


def ones(data):
    """One's-complement sum word by word (not wire/checksum.py's big-int trick)."""
    data = bytes(data)
    if len(data) & 1:
        data += b"\x00"
    words = array.array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo(src, dst, proto, length):
    return src + dst + bytes((0, proto)) + length.to_bytes(2, "big")


# -- Ethernet


@FAST
@given(st.binary(max_size=40))
def test_ethertype_of_any_bytes(frame):
    if len(frame) < ethernet.HEADER_LEN:
        with pytest.raises(MalformedFrame):
            ethernet.ethertype(frame)
    else:
        assert ethernet.ethertype(frame) == int.from_bytes(frame[12:14], "big")


@FAST
@given(macs, macs, st.integers(0, 0xFFFF), st.binary(max_size=20))
def test_ethernet_header_round_trip(dst, src, etype, body):
    frame = ethernet.header(dst, src, etype) + body
    assert frame[:6] == dst and frame[6:12] == src and ethernet.ethertype(frame) == etype


@FAST
@given(macs, st.booleans(), st.sampled_from([":", "-"]))
def test_mac_text_round_trip(mac, upper, sep):
    text = ethernet.mac_to_str(mac)
    assert ethernet.mac_from_str(text) == mac
    other = text.replace(":", sep)
    assert ethernet.mac_from_str(other.upper() if upper else other) == mac
    assert ethernet.is_unicast(mac) == (not mac[0] & 1 and mac != b"\x00" * 6)


@FAST
@given(st.text(max_size=24))
def test_mac_from_any_text_is_six_bytes_or_value_error(text):
    try:
        mac = ethernet.mac_from_str(text)
    except ValueError:
        return
    assert len(mac) == 6 and ethernet.mac_from_str(ethernet.mac_to_str(mac)) == mac


# -- IPv4


@FAST
@given(addresses, addresses, st.integers(0, 255), st.binary(max_size=64), st.integers(0, 255),
       st.integers(0, 0xFFFF), st.booleans(), st.integers(0, 255), st.integers(0, 8), buffers)
def test_ipv4_build_parse_round_trip(src, dst, proto, payload, ttl, ident, df, tos, pad, kind):
    head = ipv4.build_header(src, dst, proto, len(payload), ttl, ident, df, tos)
    assert len(head) == ipv4.HEADER_LEN and ones(head) == 0xFFFF
    frame = kind(b"\xee" * 14 + head + payload + b"\x00" * pad)  # Ethernet padding ignored
    h = ipv4.parse(frame, 14)
    assert (bytes(h.src), bytes(h.dst), h.protocol, h.ttl, h.ident, h.tos) == \
        (src, dst, proto, ttl, ident, tos)
    assert not h.fragmented and h.header_len == 20 and h.total_len == 20 + len(payload)
    assert bytes(h.payload(frame)) == payload
    quote = ipv4.quote(frame, h)
    assert isinstance(quote, bytes) and quote == bytes(head + payload[:8])


@FAST
@given(st.binary(max_size=80), st.integers(0, 3), buffers)
def test_ipv4_parse_of_any_bytes_stays_inside_the_frame(data, offset, kind):
    frame = kind(data)
    try:
        h = ipv4.parse(frame, offset)
    except MalformedFrame as e:
        assert e.reason
        return
    assert 20 <= h.header_len <= 60 and h.header_len <= h.total_len
    assert h.payload_offset == offset + h.header_len
    assert h.payload_end == offset + h.total_len <= len(frame)
    assert data[offset] >> 4 == 4


@FAST
@given(addresses, addresses, st.binary(min_size=1, max_size=3000),
       st.integers(68, 1500), st.integers(0, 0xFFFF))
def test_ipv4_fragments_fit_the_mtu_and_reassemble(src, dst, payload, mtu, ident):
    frags = ipv4.fragment(src, dst, 17, payload, mtu, ident)
    out = b""
    for i, (head, chunk) in enumerate(frags):
        assert len(head) + len(chunk) <= mtu and ones(head) == 0xFFFF
        h = ipv4.parse(head + chunk, 0)
        frag = int.from_bytes(head[6:8], "big")
        more = bool(frag & 0x2000)
        assert (frag & 0x1FFF) * 8 == len(out) and more == (i < len(frags) - 1)
        assert (h.ident, bytes(h.src), bytes(h.dst)) == (ident, src, dst)
        assert h.fragmented == (len(frags) > 1)  # one piece is a whole datagram
        if more:
            assert len(chunk) % 8 == 0
        out += chunk
    assert out == payload


# -- UDP


def _ip_view(src, dst, proto, l4, pad=0):
    frame = ipv4.build_header(src, dst, proto, len(l4)) + l4 + b"\x00" * pad
    return frame, ipv4.parse(frame, 0)


@FAST
@given(addresses, addresses, ports, ports, st.binary(max_size=100), st.integers(0, 4))
def test_udp_build_parse_round_trip_with_a_valid_checksum(src, dst, sport, dport, payload, pad):
    datagram = udp.build(src, dst, sport, dport, payload)
    assert ones(pseudo(src, dst, 17, len(datagram)) + datagram) == 0xFFFF
    assert datagram[6:8] != b"\x00\x00"  # zero would mean "no checksum"
    frame, ip = _ip_view(src, dst, 17, datagram, pad)
    got_sport, got_dport, start, end = udp.parse(frame, ip)
    assert (got_sport, got_dport, frame[start:end]) == (sport, dport, payload)
    assert udp.header(sport, dport, len(payload))[:6] == datagram[:6]


@FAST
@given(st.binary(max_size=40))
def test_udp_parse_of_any_bytes(l4):
    frame, ip = _ip_view(b"\x0a\x00\x02\x02", b"\x0a\x00\x02\x01", 17, l4)
    try:
        sport, dport, start, end = udp.parse(frame, ip)
    except MalformedFrame:
        assert len(l4) < 8 or not 8 <= int.from_bytes(l4[4:6], "big") <= len(l4)
        return
    assert ip.payload_offset + 8 == start <= end <= ip.payload_end
    assert end - ip.payload_offset == int.from_bytes(l4[4:6], "big")


# -- TCP


def _segment_frame(l4, src=b"\x0a\x00\x02\x02", dst=b"\xcb\x00\x71\x0a"):
    return _ip_view(src, dst, 6, l4)


@FAST
@given(addresses, addresses, ports, ports, u32, u32, st.integers(0, 0xFF), st.integers(0, 0xFFFF),
       st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 65535)),
       st.one_of(st.none(), st.integers(0, 255)), st.booleans(), st.one_of(st.none(), u32), u32)
def test_tcp_syn_build_parse_round_trip(src, dst, sport, dport, seq, ack, flags, window, payload,
                                        mss, wscale, sack, tsval, tsecr):
    flags |= tcp.SYN
    options = tcp.syn_options(mss, wscale, sack, tsval, tsecr)
    assert len(options) % 4 == 0 and len(options) <= 40
    head, body = tcp.build(src, dst, sport, dport, seq, ack, flags, window, payload, options)
    assert ones(pseudo(src, dst, 6, len(head) + len(body)) + head + body) == 0xFFFF
    frame, ip = _segment_frame(head + body, src, dst)
    seg = tcp.parse(frame, ip)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack, seg.flags, seg.window) == \
        (sport, dport, seq, ack, flags, window)
    assert bytes(seg.payload) == payload
    assert seg.mss == mss
    assert seg.wscale == (None if wscale is None else min(wscale, 14))
    assert seg.sack is (True if sack else None)
    assert (seg.tsval, seg.tsecr) == ((None, 0) if tsval is None else (tsval, tsecr))
    assert seg.seq_len == len(payload) + 1 + bool(flags & tcp.FIN)


@FAST
@given(st.lists(u32, min_size=2, max_size=2 * tcp.MAX_SACK_BLOCKS).filter(lambda e: len(e) % 2 == 0),
       st.one_of(st.none(), u32), u32, st.binary(max_size=32))
def test_tcp_sack_and_timestamps_round_trip(edges, tsval, tsecr, payload):
    assume(tsval is None or len(edges) <= 6)  # 40 option bytes: three blocks beside TS
    options = tcp.sack_option(edges, tsval, tsecr)
    assert len(options) % 4 == 0 and len(options) <= 40
    head, body = tcp.build(b"\0" * 4, b"\0" * 4, 1, 2, 3, 4, tcp.ACK, 5, payload, options)
    frame, ip = _segment_frame(head + body)
    seg = tcp.parse(frame, ip)
    assert seg.sack == tuple(edges) and bytes(seg.payload) == payload
    assert (seg.tsval, seg.tsecr) == ((None, 0) if tsval is None else (tsval, tsecr))
    ts_only = tcp.ts_option(tsval or 0, tsecr)
    frame, ip = _segment_frame(tcp.header(1, 2, 3, 4, tcp.ACK, 5, ts_only) + payload)
    seg = tcp.parse(frame, ip)
    assert (seg.tsval, seg.tsecr, seg.sack) == (tsval or 0, tsecr, None)


def _reference_options(opts):
    """The options of a well-formed list, walked the obvious way."""
    out = {}
    i = 0
    while i < len(opts):
        if opts[i] == 0:
            break
        if opts[i] == 1:
            i += 1
            continue
        out[opts[i]] = bytes(opts[i + 2:i + opts[i + 1]])
        i += opts[i + 1]
    return out


option = st.one_of(
    st.builds(lambda v: struct.pack("!BBH", 2, 4, v), st.integers(0, 65535)),
    st.builds(lambda v: bytes((3, 3, v)), st.integers(0, 255)),
    st.just(b"\x04\x02"),
    st.builds(lambda a, b: struct.pack("!BBII", 8, 10, a, b), u32, u32),
    st.builds(lambda n, raw: bytes((5, 2 + 8 * n)) + raw[:8 * n], st.integers(1, 4),
              st.binary(min_size=32, max_size=32)),
    st.builds(lambda kind, raw: bytes((kind, 2 + len(raw))) + raw,
              st.integers(6, 253).filter(lambda k: k != 8), st.binary(max_size=6)),
    st.just(b"\x01"),
)


@FAST
@given(st.lists(option, max_size=5, unique_by=lambda p: p[0]), st.booleans())
def test_tcp_options_agree_with_a_reference_walk(parts, syn):
    # One of each kind: no "which one wins" question.
    opts = b"".join(parts)
    assume(len(opts) <= 40)
    opts += b"\x00" * (-len(opts) % 4)
    frame, ip = _segment_frame(tcp.header(1, 2, 3, 4, tcp.SYN if syn else tcp.ACK, 5, opts))
    seg = tcp.parse(frame, ip)
    ref = _reference_options(opts)
    if syn:
        assert seg.mss == (struct.unpack("!H", ref[2])[0] if 2 in ref else None)
        assert seg.wscale == (min(ref[3][0], 14) if 3 in ref else None)
        assert seg.sack is (True if 4 in ref else None)
    else:
        assert seg.mss is None and seg.wscale is None
        if 5 in ref:
            assert seg.sack == struct.unpack(f"!{len(ref[5]) // 4}I", ref[5])
        else:
            assert seg.sack is None
    if 8 in ref:
        assert (seg.tsval, seg.tsecr) == struct.unpack("!II", ref[8])
    else:
        assert seg.tsval is None


@FAST
@given(st.binary(max_size=72), st.booleans())
def test_tcp_parse_of_any_bytes(l4, syn):
    if syn and len(l4) > 13:
        l4 = l4[:13] + bytes((l4[13] | tcp.SYN,)) + l4[14:]
    frame, ip = _segment_frame(l4)
    try:
        seg = tcp.parse(frame, ip)
    except MalformedFrame as e:
        assert e.reason in ("short-tcp", "bad-tcp-header-length")
        return
    hlen = (l4[12] >> 4) * 4
    assert 20 <= hlen <= len(l4) and bytes(seg.payload) == l4[hlen:]
    assert seg.mss is None or 0 <= seg.mss <= 65535
    assert seg.wscale is None or 0 <= seg.wscale <= 14
    if seg.flags & tcp.SYN:
        assert seg.sack in (None, True)
    else:
        assert seg.sack is None or (isinstance(seg.sack, tuple) and len(seg.sack) % 2 == 0
                                    and 2 <= len(seg.sack) <= 8)


@FAST
@given(addresses, addresses, st.integers(0, 0xFFFF), ports, ports, u32, u32, st.integers(0, 0xFF),
       st.integers(0, 0xFFFF), st.binary(max_size=100),
       st.sampled_from([b"", tcp.ts_option(7, 9), tcp.sack_option([1, 2])]))
def test_tcp_frame_header_is_a_valid_frame(src, dst, ident, sport, dport, seq, ack, flags, window,
                                           payload, options):
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    head = tcp.frame_header(eth, src, dst, ident, sport, dport, seq, ack, flags, window, payload,
                            options=options)
    frame = head + payload
    assert len(head) == tcp.FRAME_HEADER_LEN + len(options) and frame[:14] == eth
    ip = ipv4.parse(frame, 14)
    assert ones(frame[14:34]) == 0xFFFF and (ip.ident, ip.protocol) == (ident, 6)
    l4 = frame[34:]
    assert ones(pseudo(src, dst, 6, len(l4)) + l4) == 0xFFFF
    seg = tcp.parse(frame, ip)
    assert (seg.seq, seg.ack, seg.flags, seg.window, bytes(seg.payload)) == \
        (seq, ack, flags, window, payload)
    partial = tcp.build_header_partial(src, dst, sport, dport, seq, ack, flags, window,
                                       len(payload), options)
    # What the device does with a NEEDS_CSUM frame: sum from csum_start, store it.
    csum = ~ones(partial + payload) & 0xFFFF
    done = partial[:16] + csum.to_bytes(2, "big") + partial[18:]
    assert done == l4[:len(partial)]


# -- ICMP


@FAST
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_icmp_echo_reply_mirrors_the_request(ident, seq, data):
    request = icmp.build(8, 0, struct.pack("!HH", ident, seq), data)
    assert ones(request) == 0xFFFF
    reply = icmp.echo_reply(request)
    assert ones(reply) == 0xFFFF and reply[0] == 0 and reply[4:] == request[4:]
    frame, ip = _ip_view(b"\0" * 4, b"\0" * 4, 1, reply)
    assert icmp.parse(frame, ip) == (0, 0, ident, seq)


@FAST
@given(st.sampled_from([3, 11]), st.integers(0, 15), st.binary(max_size=40),
       st.integers(0, 0xFFFF), st.integers(0, 10))
def test_icmp_error_quotes_header_and_eight_bytes(kind, code, payload, mtu, options):
    head = bytearray(ipv4.build_header(b"\x0a\0\2\2", b"\xcb\0\x71\x0a", 17, 4 * options
                                       + len(payload)))
    head[0] = 0x45 + options
    quote = bytes(head) + b"\x01" * (4 * options) + payload
    message = icmp.error(kind, code, quote, mtu)
    assert ones(message) == 0xFFFF and message[:2] == bytes((kind, code))
    assert message[8:] == quote[:20 + 4 * options + 8]
    assert int.from_bytes(message[6:8], "big") == (mtu if kind == 3 and code == 4 else 0)


@FAST
@given(st.binary(max_size=20))
def test_icmp_parse_of_any_bytes(l4):
    frame, ip = _ip_view(b"\0" * 4, b"\0" * 4, 1, l4)
    try:
        fields = icmp.parse(frame, ip)
    except MalformedFrame:
        assert len(l4) < 8
        return
    assert fields == (l4[0], l4[1], *struct.unpack("!HH", l4[4:8]))


# -- virtio-net header


@FAST
@given(st.sampled_from([vnet.HEADER_LEN, vnet.HEADER_V1_LEN]), st.integers(0, 3),
       st.sampled_from([0, 1, 3, 4, 0x81]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 70000))
def test_vnet_build_parse_round_trip_or_refusal(length, flags, gso, hdr_len, gso_size, start,
                                                offset, frame_len):
    head = vnet.build(length, flags, gso, hdr_len, gso_size, start, offset)
    assert len(head) == length
    valid = (not (flags & vnet.F_NEEDS_CSUM and start + offset + 2 > frame_len)
             and not (gso and (hdr_len > frame_len or gso_size == 0)))
    if valid:
        assert vnet.parse(head, frame_len) == (flags, gso, hdr_len, gso_size, start, offset)
    else:
        with pytest.raises(MalformedFrame):
            vnet.parse(head, frame_len)


@FAST
@given(st.binary(max_size=14), st.integers(0, 70000))
def test_vnet_parse_of_any_bytes(data, frame_len):
    try:
        flags, gso, hdr_len, gso_size, start, offset = vnet.parse(data, frame_len)
    except MalformedFrame:
        return
    assert gso & ~vnet.GSO_ECN in (0, 1, 3, 4)
    assert not flags & vnet.F_NEEDS_CSUM or start + offset + 2 <= frame_len
    assert gso == 0 or (hdr_len <= frame_len and gso_size > 0)


# -- vhost-user messages


def _message(request, raw):
    """A well-formed message of ``request`` with payload bytes from ``raw``."""
    if request == vu.SET_MEM_TABLE:
        n = 1 + raw[0] % vu.MAX_REGIONS
        payload = vu.MEMORY_HEAD.pack(n, 0) + (raw * 8)[:n * vu.MEMORY_REGION.size]
        return payload, n
    size = vu.PAYLOAD_SIZE[request]
    payload = (raw * 8)[:size]
    if request in (vu.SET_VRING_KICK, vu.SET_VRING_CALL, vu.SET_VRING_ERR):
        payload = vu.U64.pack(vu.u64(payload) & ~vu.VRING_NOFD | (raw[0] & 1) << 8)
    return payload, vu.fds_expected(request, payload)


requests = st.sampled_from(sorted(vu.PAYLOAD_SIZE) + [vu.SET_MEM_TABLE])


@FAST
@given(st.lists(st.tuples(requests, st.binary(min_size=32, max_size=32), st.booleans()),
                min_size=1, max_size=6), st.data())
def test_vhost_user_reader_reassembles_any_chunking(messages, data):
    stream = b""
    expected = []
    fd = 100
    sends = []  # (bytes of one sendmsg, its fds)
    for request, raw, need_reply in messages:
        payload, nfds = _message(request, raw)
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        wire = vu.encode(request, payload, flags)
        fds = tuple(range(fd, fd + nfds))
        fd += nfds
        sends.append((wire, fds))
        expected.append(vu.Message(request, flags, payload, fds))
        stream += wire
    reader = vu.MessageReader()
    got = []
    for wire, fds in sends:
        # The kernel may split a sendmsg's bytes over reads; its fds come with
        # the first byte, and a read ends where a chunk with fds begins.
        cut = data.draw(st.integers(1, len(wire)))
        got += reader.feed(wire[:cut], fds)
        if cut < len(wire):
            got += reader.feed(wire[cut:])
    assert got == expected and reader.pending_fds == []


@FAST
@given(st.lists(st.binary(max_size=40), max_size=5), st.lists(st.integers(0, 2), max_size=5))
def test_vhost_user_reader_on_any_bytes_raises_only_protocol_error(chunks, nfds):
    reader = vu.MessageReader()
    fd = 10
    for i, chunk in enumerate(chunks):
        n = nfds[i] if i < len(nfds) else 0
        try:
            messages = reader.feed(chunk, tuple(range(fd, fd + n)))
        except vu.ProtocolError:
            return
        fd += n
        for m in messages:
            assert m.flags & vu.FLAG_VERSION_MASK == vu.VERSION and not m.flags & vu.FLAG_REPLY
            if m.request in vu.PAYLOAD_SIZE:
                assert len(m.payload) == vu.PAYLOAD_SIZE[m.request]
                assert len(m.fds) == vu.fds_expected(m.request, m.payload)


# -- DNS names


label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63)
name = st.lists(label, min_size=1, max_size=8).map(".".join).filter(
    lambda n: len(dnsname.encode(n)) <= 255 if len(n) < 300 else False)


@FAST
@given(st.lists(name, max_size=4), st.integers(0, 5))
def test_dns_names_round_trip(names, padding):
    wire = dnsname.encode_list(names)
    assert dnsname.decode_list(wire) == names
    assert dnsname.decode_list(wire + b"\x00" * padding, padded=True) == names


@FAST
@given(st.binary(max_size=80), st.booleans())
def test_dns_name_decode_of_any_bytes(data, padded):
    try:
        names = dnsname.decode_list(data, padded)
    except MalformedFrame as e:
        assert e.reason == "bad-dns-name"
        return
    for n in names:
        assert n and all(0 < len(part) < 64 for part in n.split("."))
