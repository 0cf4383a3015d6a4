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


# -- stand-ins for the stack's surroundings, shared by the unit tests


class FakeLink:
    """An ILink that records the frames the stack sends (buffers joined)."""

    description = "fake"
    mtu = 1500

    def __init__(self):
        self.sent = []

    def send_frame(self, frame):
        self.sent.append(frame if isinstance(frame, bytes) else b"".join(bytes(b) for b in frame))

    def take(self):
        """The frames sent since the last call, parsed with dpkt."""
        out, self.sent = [parse(f) for f in self.sent], []
        return out


def _descriptor_reactor():
    from twisted.internet.testing import MemoryReactorClock

    class DescriptorReactor(MemoryReactorClock):
        """A memory reactor that also tracks readers and writers, for links."""

        def __init__(self):
            super().__init__()
            self.readers = set()
            self.writers = set()

        def addReader(self, r):
            self.readers.add(r)

        def removeReader(self, r):
            self.readers.discard(r)

        def addWriter(self, w):
            self.writers.add(w)

        def removeWriter(self, w):
            self.writers.discard(w)

    return DescriptorReactor


DescriptorReactor = _descriptor_reactor()


class RecordingSink:
    """An IFrameSink that keeps each batch and each link_lost reason."""

    def __init__(self):
        self.batches = []
        self.lost = []

    def frames_received(self, frames):
        self.batches.append(list(frames))

    def link_lost(self, reason):
        self.lost.append(reason)

    @property
    def frames(self):
        return [f for b in self.batches for f in b]
