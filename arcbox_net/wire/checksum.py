"""Internet (one's-complement) checksum.

A big-int reduction is the fastest pure-Python form: 2**16 == 1 (mod 0xFFFF),
so the whole buffer read as one integer is congruent to the sum of its 16-bit
words. Partial sums of even-length chunks can be added and folded.
"""

_from_bytes = int.from_bytes


def ones_sum(data, initial=0):
    """The folded (not complemented) one's-complement sum of ``data``."""
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
