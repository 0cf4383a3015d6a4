"""Ethernet II framing."""

import struct

from . import MalformedFrame

HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6

_ETHERTYPE = struct.Struct("!H")


def ethertype(frame):
    if len(frame) < HEADER_LEN:
        raise MalformedFrame("short-ethernet", f"{len(frame)} bytes")
    return _ETHERTYPE.unpack_from(frame, 12)[0]


def header(dst, src, ethertype):
    return dst + src + _ETHERTYPE.pack(ethertype)


def is_unicast(mac):
    return not (mac[0] & 1) and mac != ZERO_MAC


def mac_to_str(mac):
    return ":".join(f"{b:02x}" for b in mac)


def mac_from_str(text):
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None
