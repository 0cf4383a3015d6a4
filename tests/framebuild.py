"""Frames for tests, built with dpkt (never with the code under test)."""

import socket

import dpkt

GUEST_MAC = b"\x02\x11\x22\x33\x44\x55"
GATEWAY_MAC = b"\x02\xab\xcb\x00\x00\x01"
GUEST_IP = "10.0.2.2"
GATEWAY_IP = "10.0.2.1"


def ip4(text):
    return socket.inet_aton(text)


def ethernet(data, ethertype=0x0800, src=GUEST_MAC, dst=GATEWAY_MAC):
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=src, type=ethertype, data=data))


def ipv4(payload, proto, src=GUEST_IP, dst=GATEWAY_IP, ttl=64, **kw):
    pkt = dpkt.ip.IP(src=ip4(src), dst=ip4(dst), p=proto, ttl=ttl, data=payload, **kw)
    pkt.len = len(pkt)
    return pkt


def arp_request(target=GATEWAY_IP, sender=GUEST_IP, mac=GUEST_MAC):
    arp = dpkt.arp.ARP(hrd=1, pro=0x0800, hln=6, pln=4, op=dpkt.arp.ARP_OP_REQUEST,
                       sha=mac, spa=ip4(sender), tha=b"\0" * 6, tpa=ip4(target))
    return ethernet(arp, 0x0806, src=mac, dst=b"\xff" * 6)


def echo_request(dst=GATEWAY_IP, ident=7, seq=1, payload=b"ping"):
    echo = dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload))
    return ethernet(ipv4(echo, 1, dst=dst))


def udp(sport, dport, payload, src=GUEST_IP, dst=GATEWAY_IP, dst_mac=GATEWAY_MAC):
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    u.ulen = len(u)
    return ethernet(ipv4(u, 17, src=src, dst=dst), dst=dst_mac)


def tcp(sport, dport, seq=0, ack=0, flags=dpkt.tcp.TH_SYN, payload=b"", win=65535,
        opts=b"", src=GUEST_IP, dst=GATEWAY_IP):
    t = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=win,
                     opts=opts, data=payload)
    t.off = (20 + len(opts)) // 4
    return ethernet(ipv4(t, 6, src=src, dst=dst))


def parse(frame):
    return dpkt.ethernet.Ethernet(bytes(frame))
