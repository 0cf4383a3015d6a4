"""Domain names in the uncompressed wire form that option formats carry
(RFC 1035 3.1): DNSSL in router advertisements (RFC 8106) and the DHCPv6
domain list (RFC 3646). Decoding is bounds-checked."""

from . import MalformedFrame


def labels(name):
    """ASCII labels as they go on the wire; IDNA only where needed."""
    out = []
    for label in name.strip(".").split("."):
        raw = label.encode("ascii") if label.isascii() else label.encode("idna")
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS label {label!r} in {name!r}")
        out.append(raw)
    return out


def encode(name):
    """One name, ending in the root label."""
    wire = b"".join(bytes([len(raw)]) + raw for raw in labels(name)) + b"\x00"
    if len(wire) > 255:
        raise ValueError(f"{name!r} is longer than 255 bytes on the wire")
    return wire


def encode_list(names):
    return b"".join(encode(n) for n in names)


def decode_list(data, padded=False):
    """The names in ``data``. ``padded``: zero bytes after the last name are
    padding (DNSSL), not empty names. Raises MalformedFrame("bad-dns-name")."""
    names = []
    pos = 0
    end = len(data)
    while pos < end:
        if padded and data[pos] == 0:
            if any(data[pos:end]):
                raise MalformedFrame("bad-dns-name", "data after padding")
            break
        parts = []
        start = pos
        while True:
            if pos >= end:
                raise MalformedFrame("bad-dns-name", "name runs past its option")
            size = data[pos]
            if size == 0:
                pos += 1
                break
            if size > 63:
                raise MalformedFrame("bad-dns-name", "compressed or oversized label")
            if pos + 1 + size > end:
                raise MalformedFrame("bad-dns-name", "label runs past its option")
            parts.append(bytes(data[pos + 1:pos + 1 + size]))
            pos += 1 + size
        if pos - start > 255:
            raise MalformedFrame("bad-dns-name", "name longer than 255 bytes")
        if not parts:
            raise MalformedFrame("bad-dns-name", "empty name")
        names.append(b".".join(parts).decode("ascii", "replace"))
    return names
