"""What code serving both IP families needs of an address or header, chosen
by address length (4 or 16 bytes), so the NATs are not written twice."""

import socket

from . import ipv4, ipv6


def quote(frame, ip):
    """The ICMP (or ICMPv6) error quote of the packet ``ip`` was parsed from."""
    return ipv6.quote(frame, ip) if len(ip.src) == 16 else ipv4.quote(frame, ip)


def address_str(raw):
    """Text form of a 4- or 16-byte address."""
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, bytes(raw))


def endpoint_str(raw, port):
    """ADDR:PORT, with an IPv6 address in brackets."""
    if len(raw) == 16:
        return f"[{address_str(raw)}]:{port}"
    return f"{address_str(raw)}:{port}"


def header_len(address):
    """Bytes of the fixed IP header of the address's family."""
    return ipv6.HEADER_LEN if len(address) == 16 else ipv4.HEADER_LEN
