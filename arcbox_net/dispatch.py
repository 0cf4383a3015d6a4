"""Frame dispatch: classify each guest frame and hand it to its handler.

Classification is by EtherType, then IP protocol, then (for UDP services the
stack offers itself) destination port. Handlers are registered as providers
of the interfaces in ``interfaces``; the dispatcher does not know what DHCP or
TCP are. A frame that cannot be handled is dropped and counted by reason;
nothing a guest sends can raise out of here.

The dispatcher is also the stack's way out to the guest (``send_ipv4``): it
knows the gateway and guest MACs and wraps IP packets in Ethernet.
"""

import struct
import time
from collections import Counter, deque

from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import (IEthernetHandler, IFlushable, IFrameSink, IIPv4Handler,
                         IUDPService)
from .wire import MalformedFrame, ethernet, ipv4, udp
from .wire.checksum import ones_sum

_BROADCAST_IP = b"\xff\xff\xff\xff"
_ARP_REQUEST = struct.Struct("!HHBBH6s4s6s4s")


@implementer(IFrameSink)
class FrameDispatcher:
    log = Logger()

    def __init__(self, config, link=None):
        self.config = config
        self.link = link
        self.gateway_mac = config.gateway_mac
        self.guest_mac = None
        self.owned = {a.packed for a in config.owned_addresses}
        self.subnet_broadcast = config.subnet.broadcast_address.packed
        self.frames_in = 0
        self.frames_out = 0
        self.drops = Counter()
        self._ethertype_handlers = {}
        self._ip_handlers = {}
        self._udp_services = {}
        self._flushables = []
        self._ident = 0
        # IP packets waiting for the guest's MAC (we spoke first: a port
        # forward to a guest that has not sent anything yet).
        self._unresolved = deque(maxlen=256)
        self._last_arp_request = -1.0
        self.on_link_lost = None
        #: A packet capture (``pcap.PcapCapture``) seeing every frame both ways, or None.
        self.capture = None

    # -- registration

    def register(self, handler):
        """File ``handler`` under every dispatch interface it provides."""
        known = False
        if IEthernetHandler.providedBy(handler):
            self._ethertype_handlers[handler.ethertype] = handler
            known = True
        if IIPv4Handler.providedBy(handler):
            self._ip_handlers[handler.ip_protocol] = handler
            known = True
        if IUDPService.providedBy(handler):
            self._udp_services[handler.udp_port] = handler
            known = True
        if IFlushable.providedBy(handler):
            self._flushables.append(handler)
            known = True
        if not known:
            raise TypeError(f"{handler!r} provides no dispatch interface")

    # -- IFrameSink

    def frames_received(self, frames):
        capture = self.capture
        for frame in frames:
            self.frames_in += 1
            if capture is not None:
                capture.write(frame)
            try:
                self._dispatch(frame)
            except MalformedFrame as e:
                self.drops[e.reason] += 1
            except Exception:
                self.drops["handler-error"] += 1
                self.log.failure("handler failed on a guest frame")
        for handler in self._flushables:
            try:
                handler.flush()
            except Exception:
                self.drops["handler-error"] += 1
                self.log.failure("handler failed to flush")

    def link_lost(self, reason):
        if self.on_link_lost is not None:
            self.on_link_lost(reason)

    # -- classification

    def _dispatch(self, frame):
        if len(frame) < ethernet.HEADER_LEN:
            raise MalformedFrame("short-ethernet")
        dst_mac = frame[0:6]
        src_mac = frame[6:12]
        if dst_mac != self.gateway_mac and dst_mac != ethernet.BROADCAST:
            raise MalformedFrame("multicast" if dst_mac[0] & 1 else "not-for-gateway-mac")
        if src_mac != self.guest_mac:
            self._learn(src_mac)
        etype = (frame[12] << 8) | frame[13]
        if etype == ethernet.ETHERTYPE_IPV4:
            self._dispatch_ipv4(frame)
            return
        handler = self._ethertype_handlers.get(etype)
        if handler is None:
            raise MalformedFrame("ipv6" if etype == ethernet.ETHERTYPE_IPV6 else "unknown-ethertype")
        handler.handle_frame(frame)

    def _learn(self, mac):
        if not ethernet.is_unicast(mac):
            raise MalformedFrame("bad-source-mac")
        if self.guest_mac is None:
            self.log.info("learned guest MAC {mac}", mac=ethernet.mac_to_str(mac))
        else:
            self.log.info("guest MAC changed from {old} to {mac}",
                          old=ethernet.mac_to_str(self.guest_mac), mac=ethernet.mac_to_str(mac))
        self.guest_mac = bytes(mac)
        while self._unresolved:
            self.send_frame([self.ethernet_header(), *self._unresolved.popleft()])

    def _dispatch_ipv4(self, frame):
        ip = ipv4.parse(frame, ethernet.HEADER_LEN)
        if ones_sum(frame[14:14 + ip.header_len]) != 0xFFFF:
            raise MalformedFrame("bad-ipv4-checksum")
        if ip.fragmented:
            raise MalformedFrame("ipv4-fragment")
        proto = ip.protocol
        if proto == ipv4.PROTO_UDP:
            sport, dport, start, end = udp.parse(frame, ip)
            service = self._udp_services.get(dport)
            if service is not None and (not service.local_only or ip.dst in self.owned
                                        or ip.dst == _BROADCAST_IP):
                service.handle_datagram(frame, ip, sport, frame[start:end])
                return
        if ip.dst == _BROADCAST_IP or ip.dst == self.subnet_broadcast:
            raise MalformedFrame("broadcast")
        if ip.dst[0] >= 224:
            raise MalformedFrame("multicast")
        handler = self._ip_handlers.get(proto)
        if handler is None:
            raise MalformedFrame(f"no-handler-ip-proto-{proto}" if proto in (1, 6, 17)
                                 else "unsupported-ip-protocol")
        handler.handle_ipv4(frame, ip)

    # -- the way out

    def send_frame(self, frame, vnet=None):
        """Send one frame; ``vnet`` is offload metadata for links that offload."""
        if self.link is None:
            self.drops["no-link"] += 1
            return
        self.frames_out += 1
        if self.capture is not None:
            self.capture.write(frame)
        if vnet is None:
            self.link.send_frame(frame)
        else:
            self.link.send_frame(frame, vnet)

    def ethernet_header(self, dst_mac=None, ethertype=ethernet.ETHERTYPE_IPV4):
        if dst_mac is None:
            dst_mac = self.guest_mac or ethernet.BROADCAST
        return ethernet.header(dst_mac, self.gateway_mac, ethertype)

    def next_ident(self):
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def send_ipv4(self, src, dst, protocol, payload, dst_mac=None, ttl=64):
        """Wrap an L4 payload (bytes, or a list of buffers) in IPv4 and Ethernet."""
        if dst_mac is None and self.guest_mac is None:
            self._hold_until_resolved(src, dst, protocol, payload, ttl)
            return
        if isinstance(payload, (bytes, bytearray, memoryview)):
            length = len(payload)
            head = self.ethernet_header(dst_mac) + ipv4.build_header(
                src, dst, protocol, length, ttl=ttl, ident=self.next_ident())
            self.send_frame(head + payload if length < 2048 else [head, payload])
        else:
            length = sum(len(p) for p in payload)
            head = self.ethernet_header(dst_mac) + ipv4.build_header(
                src, dst, protocol, length, ttl=ttl, ident=self.next_ident())
            self.send_frame([head, *payload])

    def _hold_until_resolved(self, src, dst, protocol, payload, ttl):
        """Queue the packet and ask the guest for its MAC (at most once a second)."""
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = [bytes(payload)]
        else:
            payload = [bytes(p) for p in payload]
        length = sum(len(p) for p in payload)
        if len(self._unresolved) == self._unresolved.maxlen:
            self.drops["unresolved-queue-full"] += 1
        self._unresolved.append([ipv4.build_header(src, dst, protocol, length, ttl=ttl,
                                                   ident=self.next_ident()), *payload])
        now = time.monotonic()
        if now - self._last_arp_request >= 1.0:
            self._last_arp_request = now
            self.send_frame(ethernet.header(ethernet.BROADCAST, self.gateway_mac,
                                            ethernet.ETHERTYPE_ARP)
                            + _ARP_REQUEST.pack(1, 0x0800, 6, 4, 1, self.gateway_mac,
                                                self.config.gateway.packed, b"\0" * 6, dst))

    def send_udp(self, src, dst, sport, dport, payload, dst_mac=None):
        self.send_ipv4(src, dst, ipv4.PROTO_UDP, udp.build(src, dst, sport, dport, payload),
                       dst_mac=dst_mac)

    def stats(self):
        return {"frames_in": self.frames_in, "frames_out": self.frames_out,
                "drops": dict(self.drops)}
