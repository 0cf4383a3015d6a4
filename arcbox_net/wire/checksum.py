"""Internet (one's-complement) checksum.

A big-int reduction is the fastest pure-Python form: 2**16 == 1 (mod 0xFFFF),
so the whole buffer read as one integer is congruent to the sum of its 16-bit
words. Partial sums of even-length chunks can be added and folded.

numpy is optional (the extra ``arcbox-net[fast]``): with it, buffers above
4 KiB are summed as vectors; without it every sum takes the big-int path, which
gives the same values. tests/unit/test_checksum.py checks both against a
word-by-word reference.
"""

try:
    import numpy as _np
except ImportError:  # not installed: arcbox-net[fast] adds it; the big-int sum serves alone
    _np = None

_from_bytes = int.from_bytes
#: Above this many bytes numpy's vector sum beats the big-int reduction
#: (measured: equal at ~2 KiB, 7x faster at 64 KiB with 16-bit words).
_NUMPY_FROM = 4096


def _numpy_sum(data):
    """Sum of little-endian words, folded, byte-swapped: RFC 1071 allows any order
    and any word size that folds back to 16 bits. 32-bit words halve the work
    (64 KiB: 14 -> 7 us); the 0-3 bytes left over are added as 16-bit words."""
    size = len(data)
    words = size >> 2
    total = int(_np.frombuffer(data, dtype="<u4", count=words).sum(dtype=_np.uint64))
    i = words << 2
    if size - i >= 2:
        total += data[i] | (data[i + 1] << 8)
        i += 2
    if i < size:
        total += data[i]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ((total & 0xFF) << 8) | (total >> 8)


def ones_sum(data, initial=0):
    """The folded (not complemented) one's-complement sum of ``data``."""
    if len(data) > _NUMPY_FROM and _np is not None:
        total = _numpy_sum(data) + initial
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        return total
    value = _from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF
    total += initial
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def fold(total):
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data, initial=0):
    """The checksum field value for ``data`` (plus an optional partial sum)."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src, dst, protocol, length):
    """Partial sum of the IPv4 pseudo-header used by TCP and UDP."""
    return ones_sum(src + dst, protocol + length)
