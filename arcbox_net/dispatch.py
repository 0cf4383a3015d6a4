"""Frame dispatch: classify each guest frame and hand it to its handler.

Classification is by EtherType, then IP protocol, then (for UDP services the
stack offers itself) destination port. Handlers are registered as providers
of the interfaces in ``interfaces``; the dispatcher does not know what DHCP or
TCP are. A frame that cannot be handled is dropped and counted by reason;
nothing a guest sends can raise out of here.

The way out to the guest is not here: handlers answer through the framer
(``dispatcher.framer``, framer.py), which the dispatcher tells the guest's MAC
it learns.
"""

from collections import Counter

from twisted.logger import Logger
from zope.interface import implementer

from .framer import Framer
from .interfaces import (IEthernetHandler, IFlushable, IFrameSink, IIPv4Handler,
                         IUDPService)
from .wire import MalformedFrame, ethernet, ipv4, udp
from .wire.checksum import ones_sum

_BROADCAST_IP = b"\xff\xff\xff\xff"


@implementer(IFrameSink)
class FrameDispatcher:
    log = Logger()

    def __init__(self, config, link=None):
        self.config = config
        self.link = link
        #: The one way out to the guest; it also keeps the guest's MAC.
        self.framer = Framer(config, link)
        self.gateway_mac = config.gateway_mac
        self.owned = {a.packed for a in config.owned_addresses}
        self.subnet_broadcast = config.subnet.broadcast_address.packed
        self.frames_in = 0
        self.drops = Counter()
        self._ethertype_handlers = {}
        self._ip_handlers = {}
        self._udp_services = {}
        self._flushables = []
        self.on_link_lost = None
        self._capture = None

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
        self.framer.resolved(mac)

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

    # -- the way out: the framer

    @property
    def guest_mac(self):
        return self.framer.guest_mac

    @guest_mac.setter
    def guest_mac(self, mac):
        self.framer.guest_mac = mac

    @property
    def frames_out(self):
        return self.framer.frames_out

    @property
    def capture(self):
        """A packet capture (``pcap.PcapCapture``) seeing every frame both ways, or None."""
        return self._capture

    @capture.setter
    def capture(self, capture):
        self._capture = capture
        self.framer.capture = capture

    def stats(self):
        return {"frames_in": self.frames_in, "frames_out": self.frames_out,
                "drops": dict(self.drops + self.framer.drops)}
