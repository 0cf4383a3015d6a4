"""What a peer without offloads needs of an offload frame: sans-I/O.

A link that declares checksum offload and TCP GSO (v4 and v6) to the framer
before it knows its peer (the vhost-user guest negotiates features after the stack
has sized its TCP segments) must still serve a guest that turned them down:
``finish`` completes a partial checksum (NEEDS_CSUM) and cuts a GSO frame
into MSS-sized frames with full checksums, as the guest's kernel would have.
The framer's frames have no IPv6 extension headers, so a TCPv6 frame's TCP
header follows the fixed 40 bytes.
Linux guests take both offloads, so this is the rare path; it copies.
"""

import struct

from ..wire import ipv6, vnet
from ..wire.checksum import checksum, pseudo_header_sum

_U16 = struct.Struct("!H")
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80
_ETH = 14


class OffloadError(ValueError):
    """The frame does not hold what its virtio-net header says."""


def _store_sum(buf, start, offset):
    """Sum ``buf[start:]`` (its checksum field holds the pseudo-header's
    partial sum) and store the result at ``start + offset``."""
    _U16.pack_into(buf, start + offset, checksum(bytes(buf[start:]), 0))


def finish(frame, header, csum=True, tso4=True, tso6=True):
    """The frames to send for ``frame`` (bytes) and its virtio-net ``header``
    when the peer takes partial checksums (``csum``) and TCPv4/TCPv6 GSO
    (``tso4``/``tso6``) or not: a list of (frame, header or None) -- None
    meaning a complete frame.
    """
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet.parse(header, len(frame))
    gso = gso_type & ~vnet.GSO_ECN
    if gso == vnet.GSO_NONE or (csum and (tso4 and gso == vnet.GSO_TCPV4
                                          or tso6 and gso == vnet.GSO_TCPV6)):
        if not flags & vnet.F_NEEDS_CSUM or csum:
            return [(frame, header)]
        buf = bytearray(frame)
        _store_sum(buf, csum_start, csum_offset)
        return [(bytes(buf), None)]
    if gso == vnet.GSO_TCPV4:
        return [(f, None) for f in segment_tcpv4(frame, gso_size)]
    if gso == vnet.GSO_TCPV6:
        return [(f, None) for f in segment_tcpv6(frame, gso_size)]
    raise OffloadError(f"GSO type {gso_type} cannot be cut here")


def _tcp_segments(tcp_head, payload, mss, src, dst, pseudo_sum):
    """(TCP header, chunk) of each segment a GSO payload is cut into: the
    sequence advanced, FIN/PSH only on the last, CWR only on the first, and
    the checksum over the pseudo-header ``pseudo_sum(src, dst, 6, length)``."""
    seq = struct.unpack_from("!I", tcp_head, 4)[0]
    tcp_flags = tcp_head[13]
    count = max(1, -(-len(payload) // mss))
    for i in range(count):
        chunk = bytes(payload[i * mss:(i + 1) * mss])
        th = bytearray(tcp_head)
        struct.pack_into("!I", th, 4, (seq + i * mss) & 0xFFFFFFFF)
        f = tcp_flags
        if i != count - 1:
            f &= ~(_TCP_FIN | _TCP_PSH)
        if i:
            f &= ~_TCP_CWR
        th[13] = f
        _U16.pack_into(th, 16, 0)
        length = len(th) + len(chunk)
        _U16.pack_into(th, 16, checksum(bytes(th) + chunk, pseudo_sum(src, dst, 6, length)))
        yield i, bytes(th), chunk


def segment_tcpv4(frame, mss):
    """Cut a TCPv4 GSO frame into frames of at most ``mss`` payload bytes,
    each with its own IPv4 length, ident and checksums and TCP sequence."""
    if len(frame) < _ETH + 20 or frame[_ETH] >> 4 != 4:
        raise OffloadError("not an IPv4 frame")
    ihl = (frame[_ETH] & 0x0F) * 4
    tcp_at = _ETH + ihl
    if len(frame) < tcp_at + 20:
        raise OffloadError("short TCP header")
    thl = (frame[tcp_at + 12] >> 4) * 4
    payload_at = tcp_at + thl
    if ihl < 20 or thl < 20 or len(frame) < payload_at:
        raise OffloadError("bad IPv4/TCP header length")
    eth_ip = bytearray(frame[:tcp_at])
    tcp_head = bytearray(frame[tcp_at:payload_at])
    payload = memoryview(frame)[payload_at:]
    src, dst = bytes(eth_ip[_ETH + 12:_ETH + 16]), bytes(eth_ip[_ETH + 16:_ETH + 20])
    ident = _U16.unpack_from(eth_ip, _ETH + 4)[0]
    out = []
    for i, th, chunk in _tcp_segments(tcp_head, payload, mss, src, dst, pseudo_header_sum):
        ip = bytearray(eth_ip)
        _U16.pack_into(ip, _ETH + 2, ihl + thl + len(chunk))
        _U16.pack_into(ip, _ETH + 4, (ident + i) & 0xFFFF)
        _U16.pack_into(ip, _ETH + 10, 0)
        _U16.pack_into(ip, _ETH + 10, checksum(bytes(ip[_ETH:])))
        out.append(bytes(ip) + th + chunk)
    return out


def segment_tcpv6(frame, mss):
    """Cut a TCPv6 GSO frame (no extension headers) into frames of at most
    ``mss`` payload bytes, each with its own payload length, TCP sequence and
    checksum (IPv6 has no header checksum and no ident outside fragments)."""
    if len(frame) < _ETH + ipv6.HEADER_LEN or frame[_ETH] >> 4 != 6:
        raise OffloadError("not an IPv6 frame")
    if frame[_ETH + 6] != 6:
        raise OffloadError("not a TCP segment right after the IPv6 header")
    tcp_at = _ETH + ipv6.HEADER_LEN
    if len(frame) < tcp_at + 20:
        raise OffloadError("short TCP header")
    thl = (frame[tcp_at + 12] >> 4) * 4
    payload_at = tcp_at + thl
    if thl < 20 or len(frame) < payload_at:
        raise OffloadError("bad TCP header length")
    eth_ip = bytes(frame[:tcp_at])
    tcp_head = bytearray(frame[tcp_at:payload_at])
    payload = memoryview(frame)[payload_at:]
    src, dst = eth_ip[_ETH + 8:_ETH + 24], eth_ip[_ETH + 24:_ETH + 40]
    out = []
    for _i, th, chunk in _tcp_segments(tcp_head, payload, mss, src, dst,
                                       ipv6.pseudo_header_sum):
        ip = bytearray(eth_ip)
        _U16.pack_into(ip, _ETH + 4, thl + len(chunk))
        out.append(bytes(ip) + th + chunk)
    return out
