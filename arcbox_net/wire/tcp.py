"""TCP segment view and builder.

Options are decoded on SYN segments (MSS, window scale, SACK permitted,
timestamps) and, on other segments, only when the header has options at
all: then the timestamps (RFC 7323) and the SACK blocks (RFC 2018) are
picked out. A segment without options costs no option parsing, and one
with only timestamps in the layout every stack sends (NOP, NOP, TS: 32
header bytes) costs one unpack.
"""

import struct

from . import MalformedFrame
from .checksum import checksum, fold, ones_sum, pseudo_header_sum
from .ipv4 import PROTO_TCP

HEADER_LEN = 20

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
#: The flags that say what a segment is: ``flags & CONTROL_FLAGS == SYN`` is a
#: pure SYN (an opening, not a SYN-ACK, RST or FIN).
CONTROL_FLAGS = SYN | ACK | RST | FIN
URG = 0x20

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8
#: SACK blocks one option can carry alongside nothing else (40 option bytes).
MAX_SACK_BLOCKS = 4
#: ... and alongside timestamps (12 + 2 + 2 + 3 * 8 = 40 bytes).
MAX_SACK_BLOCKS_TS = 3
#: Bytes the timestamps option takes in every segment once negotiated (two
#: NOPs to align it, as every stack sends it): payload room they cost.
TS_OPTION_LEN = 12

_HEADER = struct.Struct("!HHIIBBHHH")
#: NOP, NOP, timestamps (kind, length), TSval, TSecr.
_TS = struct.Struct("!II")
_TS_OPTION = struct.Struct("!III")
_TS_WORD = (OPT_NOP << 24) | (OPT_NOP << 16) | (OPT_TIMESTAMP << 8) | 10
#: Ethernet, IPv4 without options and TCP without options, in one pack.
_FRAME_HEADER = struct.Struct("!14sBBHHHBBH4s4sHHIIBBHHH")
FRAME_HEADER_LEN = _FRAME_HEADER.size
_from_bytes = int.from_bytes


class TcpSegment:
    """A parsed TCP segment; ``payload`` is a slice of the frame."""

    __slots__ = ("src_port", "dst_port", "seq", "ack", "flags", "window",
                 "payload", "mss", "wscale", "sack", "tsval", "tsecr")

    def __init__(self, src_port, dst_port, seq, ack, flags, window,
                 payload=b"", mss=None, wscale=None, sack=None, tsval=None, tsecr=0):
        self.src_port = src_port
        self.dst_port = dst_port
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.payload = payload
        self.mss = mss
        self.wscale = wscale
        #: On a SYN: True if SACK is permitted. Otherwise the SACK blocks as
        #: one flat tuple of edges (left, right, left, right, ...), or None.
        self.sack = sack
        #: The timestamps option (RFC 7323): TSval, or None without one, and TSecr.
        self.tsval = tsval
        self.tsecr = tsecr

    def __repr__(self):
        return (f"TcpSegment({self.src_port}->{self.dst_port} seq={self.seq} "
                f"ack={self.ack} flags={flags_str(self.flags)} win={self.window} "
                f"len={len(self.payload)} mss={self.mss} wscale={self.wscale} "
                f"sack={self.sack} ts={self.tsval},{self.tsecr})")

    @property
    def seq_len(self):
        """Sequence space consumed: payload plus one each for SYN and FIN."""
        return len(self.payload) + bool(self.flags & SYN) + bool(self.flags & FIN)


def flags_str(flags):
    names = ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"), (ACK, "A"), (URG, "U"))
    return "".join(n for bit, n in names if flags & bit) or "-"


def parse(frame, ip):
    """Parse the segment in ``frame`` (a memoryview or bytes) after ``ip``."""
    off = ip.payload_offset
    end = ip.payload_end
    if end - off < HEADER_LEN:
        raise MalformedFrame("short-tcp")
    sport, dport, seq, ack, data_off, flags, window, _csum, _urg = \
        _HEADER.unpack_from(frame, off)
    hlen = (data_off >> 4) * 4
    if hlen < HEADER_LEN or off + hlen > end:
        raise MalformedFrame("bad-tcp-header-length")
    seg = TcpSegment(sport, dport, seq, ack, flags, window, frame[off + hlen:end])
    if hlen > HEADER_LEN:
        if flags & SYN:
            _parse_syn_options(frame[off + HEADER_LEN:off + hlen], seg)
        elif hlen == HEADER_LEN + TS_OPTION_LEN and \
                _TS_OPTION.unpack_from(frame, off + HEADER_LEN)[0] == _TS_WORD:
            seg.tsval, seg.tsecr = _TS.unpack_from(frame, off + HEADER_LEN + 4)
        else:
            _parse_options(frame[off + HEADER_LEN:off + hlen], seg)
    return seg


def _options(opts):
    """(kind, offset, length) of each option, stopping at END or at the first
    option whose length is impossible (the rest cannot be trusted)."""
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == OPT_END:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            return
        length = opts[i + 1]
        if length < 2 or i + length > n:
            return
        yield kind, i, length
        i += length


def _parse_options(opts, seg):
    """The timestamps and SACK blocks of a non-SYN segment, if it has them."""
    for kind, i, length in _options(opts):
        if kind == OPT_SACK:
            count = (length - 2) // 8
            if count and length == 2 + 8 * count:
                seg.sack = struct.unpack_from(f"!{2 * count}I", opts, i + 2)
        elif kind == OPT_TIMESTAMP and length == 10:
            seg.tsval, seg.tsecr = _TS.unpack_from(opts, i + 2)


def _parse_syn_options(opts, seg):
    for kind, i, length in _options(opts):
        if kind == OPT_MSS and length == 4:
            seg.mss = (opts[i + 2] << 8) | opts[i + 3]
        elif kind == OPT_WSCALE and length == 3:
            seg.wscale = min(opts[i + 2], 14)
        elif kind == OPT_SACK_PERMITTED and length == 2:
            seg.sack = True
        elif kind == OPT_TIMESTAMP and length == 10:
            seg.tsval, seg.tsecr = _TS.unpack_from(opts, i + 2)


def syn_options(mss=None, wscale=None, sack_permitted=False, tsval=None, tsecr=0):
    """SYN options in Linux's layout: SACK permitted shares the timestamps'
    alignment NOPs (MSS, SACK-permitted+TS, NOP+wscale: 20 bytes)."""
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, mss)
    if tsval is not None:
        out += struct.pack("!BBBBII", *((OPT_SACK_PERMITTED, 2) if sack_permitted
                                        else (OPT_NOP, OPT_NOP)),
                           OPT_TIMESTAMP, 10, tsval & 0xFFFFFFFF, tsecr & 0xFFFFFFFF)
    elif sack_permitted:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
    if wscale is not None:
        out += struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, wscale)
    return out


def ts_option(tsval, tsecr):
    """NOP, NOP, timestamps: the 12 option bytes of every segment once
    timestamps are negotiated (one pack)."""
    return _TS_OPTION.pack(_TS_WORD, tsval, tsecr)


def sack_option(edges, tsval=None, tsecr=0):
    """The SACK option for blocks given flat, (left, right, left, right, ...),
    padded with two NOPs to a multiple of four bytes; with ``tsval`` the
    timestamps option first (at most three blocks then fit)."""
    count = len(edges) // 2
    if tsval is None:
        return struct.pack(f"!BBBB{2 * count}I", OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * count,
                           *(e & 0xFFFFFFFF for e in edges))
    return struct.pack(f"!IIIBBBB{2 * count}I", _TS_WORD, tsval, tsecr,
                       OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * count,
                       *(e & 0xFFFFFFFF for e in edges))


def header(sport, dport, seq, ack, flags, window, options=b""):
    """TCP header (+options) with the checksum field zero: the framer fills it."""
    hlen = HEADER_LEN + len(options)
    return _HEADER.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                        (hlen // 4) << 4, flags, window, 0, 0) + options


def build(src_ip, dst_ip, sport, dport, seq, ack, flags, window,
          payload=b"", options=b""):
    """TCP header (+options) + payload as bytes, checksum filled in."""
    head = header(sport, dport, seq, ack, flags, window, options)
    length = len(head) + len(payload)
    partial = pseudo_header_sum(src_ip, dst_ip, PROTO_TCP, length)
    if payload:
        partial = ones_sum(payload, partial)
    csum = checksum(head, partial)
    return head[:16] + csum.to_bytes(2, "big") + head[18:], payload


def frame_header(ethernet, src_ip, dst_ip, ident, sport, dport, seq, ack, flags, window,
                 payload, ttl=64, options=b""):
    """Ethernet + IPv4 + TCP headers (54 bytes + ``options``), both checksums
    computed: the per-frame path of links without checksum offload.

    One struct pack and one ``ones_sum`` of the payload; the header words are
    summed as integers instead of packed, sliced and summed again (a third of
    the per-frame cost at MTU 1500 went there). Options (a multiple of four
    bytes: the timestamps of every segment, once negotiated) cost one more
    sum of their few bytes and a join.
    """
    size = len(payload)
    opt_len = len(options)
    tcp_len = HEADER_LEN + opt_len + size
    off_flags = 0x5000 + (opt_len << 10)
    seq &= 0xFFFFFFFF
    ack &= 0xFFFFFFFF
    src = _from_bytes(src_ip, "big")
    dst = _from_bytes(dst_ip, "big")
    addresses = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
    total = (addresses + PROTO_TCP + tcp_len + sport + dport + (seq >> 16) + (seq & 0xFFFF)
             + (ack >> 16) + (ack & 0xFFFF) + off_flags + flags + window)
    if size:
        total += ones_sum(payload)
    if opt_len:
        total += _from_bytes(options, "big") % 0xFFFF
    # Every term is non-negative and the header words are not all zero, so
    # folding gives the one's-complement sum (1..0xFFFF), never the other zero.
    tcp_csum = ~fold(total) & 0xFFFF
    ident &= 0xFFFF
    ip_len = 20 + tcp_len
    ip_csum = ~fold(0x4500 + ip_len + ident + 0x4000 + (ttl << 8) + PROTO_TCP + addresses) \
        & 0xFFFF
    head = _FRAME_HEADER.pack(ethernet, 0x45, 0, ip_len, ident, 0x4000, ttl, PROTO_TCP,
                              ip_csum, src_ip, dst_ip, sport, dport, seq, ack,
                              off_flags >> 8, flags, window, tcp_csum, 0)
    return head + options if opt_len else head


def build_header_partial(src_ip, dst_ip, sport, dport, seq, ack, flags, window,
                         payload_len, options=b""):
    """TCP header for checksum offload: the field holds the pseudo-header sum only.

    The device (or the guest kernel, for a virtio/TAP frame marked
    NEEDS_CSUM) sums the rest from csum_start and stores the result.
    """
    hlen = HEADER_LEN + len(options)
    partial = pseudo_header_sum(src_ip, dst_ip, PROTO_TCP, hlen + payload_len)
    return _HEADER.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hlen // 4) << 4,
                        flags, window, partial, 0) + options
