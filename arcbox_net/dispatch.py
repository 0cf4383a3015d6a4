"""Frame dispatch: classify each guest frame and hand it to its handler.

Classification is by EtherType, then IP protocol, then (for UDP services the
stack offers itself) destination port. Handlers are registered as providers
of the interfaces in ``interfaces``; the dispatcher does not know what DHCP or
TCP are. A frame that cannot be handled is dropped and counted by reason;
nothing a guest sends can raise out of here.

The way out to the guest is not here: handlers answer through the framer
(``dispatcher.framer``, framer.py). The dispatcher validates each IPv4
frame's source address against the neighbour table (neighbours.py): a
source that is not its MAC's (leased or configured) is dropped as
``spoofed-source`` before any handler sees it, and a valid one confirms the
framer's entry for it. Lines a guest can cause per frame are rate-limited
(ratelimit.py); the drop counters carry the detail.

IPv6 frames take the same road with 16-byte addresses: the header chain is
walked with bounds checks (wire/ipv6.py), the source validated the same way
(the unspecified source only for ICMPv6, where NDP's duplicate address
detection and router solicitations use it), fragments dropped and counted,
DHCPv6 and DNS served on their ports, multicast destinations taken only by
ICMPv6 (NDP) and DHCPv6 (frames to 33:33 MACs only as IPv6), and the rest
handed to the ``IIPv6Handler`` of its protocol (TCP, UDP and ICMP NAT serve
both families). With ``--no-ipv6`` every IPv6 frame
is dropped as ``ipv6-disabled``.
"""

import ipaddress
from collections import Counter

from twisted.logger import Logger
from zope.interface import implementer

from .framer import Framer
from .interfaces import (IEthernetHandler, IFlushable, IFrameSink, IIPv4Handler, IIPv6Handler,
                         IUDP6Service, IUDPService)
from .ratelimit import LimitedLog
from .wire import MalformedFrame, ethernet, ipv4, ipv6, udp
from .wire.checksum import ones_sum

_BROADCAST_IP = b"\xff\xff\xff\xff"
_ZERO_IP = b"\x00\x00\x00\x00"
_DHCP_SERVER_PORT = 67


_ALL_DHCP_SERVERS = ipv6.ALL_DHCP_SERVERS
_DHCPV6_SERVER_PORT = 547
_ZERO6 = bytes(16)
_ICMPV6 = ipv6.NH_ICMPV6


def _ip_str(address):
    if len(address) == 16:
        return str(ipaddress.IPv6Address(bytes(address)))
    return ".".join(str(b) for b in address)


@implementer(IFrameSink)
class FrameDispatcher:
    log = Logger()

    def __init__(self, config, link=None, clock=None):
        self.config = config
        self.link = link
        #: The one way out to the guest; it also keeps the neighbour table.
        self.framer = Framer(config, link) if clock is None else Framer(config, link, clock)
        self.neighbours = self.framer.neighbours
        self._macs = self.neighbours.macs
        self._seen = self.neighbours.seen
        self._now = 0.0
        self._last_expire = None
        self.limited_log = LimitedLog(self.log, clock=self.framer.clock)
        self.gateway_mac = config.gateway_mac
        self.owned = {a.packed for a in config.owned_addresses}
        #: The stack's own IPv6 addresses: the gateway and the router's link-local.
        self.owned6 = {a.packed for a in config.owned_addresses6}
        self.ipv6 = config.ipv6
        self.subnet_broadcast = config.subnet.broadcast_address.packed
        self.frames_in = 0
        self.drops = Counter()
        self._ethertype_handlers = {}
        self._ip_handlers = {}
        self._udp_services = {}
        self._ip6_handlers = {}
        self._udp6_services = {}
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
        if IIPv6Handler.providedBy(handler):
            self._ip6_handlers[handler.ip_protocol] = handler
            known = True
        if IUDP6Service.providedBy(handler):
            self._udp6_services[handler.udp_port] = handler
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
        now = self._now = self.framer.clock()
        if self._last_expire is None or now - self._last_expire >= 10.0:
            self._last_expire = now
            self.neighbours.expire(now)
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
                self.limited_log.failure("handler failed on a guest frame")
        for handler in self._flushables:
            try:
                handler.flush()
            except Exception:
                self.drops["handler-error"] += 1
                self.limited_log.failure("handler failed to flush")

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
            if dst_mac[0] & 1 == 0:
                raise MalformedFrame("not-for-gateway-mac")
            if dst_mac[:2] != b"\x33\x33" or frame[12:14] != b"\x86\xdd":
                raise MalformedFrame("multicast")
            # IPv6 multicast (NDP, RS, DHCPv6): the IPv6 path checks the group.
        if not ethernet.is_unicast(src_mac):
            raise MalformedFrame("bad-source-mac")
        etype = (frame[12] << 8) | frame[13]
        if etype == ethernet.ETHERTYPE_IPV4:
            self._dispatch_ipv4(frame, src_mac)
            return
        if etype == ethernet.ETHERTYPE_IPV6:
            if not self.ipv6:
                raise MalformedFrame("ipv6-disabled")
            self._dispatch_ipv6(frame, src_mac)
            return
        handler = self._ethertype_handlers.get(etype)
        if handler is None:
            raise MalformedFrame("unknown-ethertype")
        handler.handle_frame(frame)

    def _check_source(self, ip, src_mac, frame):
        """Is this IP frame's source address its MAC's? (The fast path,
        one lookup, is in ``_dispatch_ipv4``/``_dispatch_ipv6``.) A valid one
        is learned."""
        src = bytes(ip.src)
        l4 = ip.payload_offset
        if len(src) == 4 and ip.protocol == 17 and len(frame) >= l4 + 4 and frame[l4 + 2] == 0 \
                and frame[l4 + 3] == _DHCP_SERVER_PORT:
            # DHCP decides for itself (it NAKs what it never leased): a client
            # before it has an address (0.0.0.0), or renewing one this stack
            # does not know (after a restart), must reach it. Nothing is learned.
            return
        if src == _ZERO_IP:
            raise MalformedFrame("spoofed-source")
        src_mac = bytes(src_mac)
        if not self.neighbours.valid_source(src, src_mac, self._now):
            self.limited_log.warn(
                "dropping guest frames from {mac} with source {address}: not its address",
                key="spoofed-source", mac=ethernet.mac_to_str(src_mac), address=_ip_str(src))
            raise MalformedFrame("spoofed-source")
        old = self._macs.get(src)
        self.framer.learn(src, src_mac, self._now)
        if old is None:
            self.limited_log.info("neighbour {address} is at {mac}", key="neighbour",
                                  address=_ip_str(src),
                                  mac=ethernet.mac_to_str(src_mac))
        else:
            self.limited_log.info("neighbour {address} moved from {old} to {mac}",
                                  key="neighbour", address=_ip_str(src),
                                  old=ethernet.mac_to_str(old), mac=ethernet.mac_to_str(src_mac))

    def _dispatch_ipv4(self, frame, src_mac):
        ip = ipv4.parse(frame, ethernet.HEADER_LEN)
        if ones_sum(frame[14:14 + ip.header_len]) != 0xFFFF:
            raise MalformedFrame("bad-ipv4-checksum")
        if self._macs.get(ip.src) == src_mac:
            self._seen[ip.src] = self._now
        else:
            self._check_source(ip, src_mac, frame)
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

    def _dispatch_ipv6(self, frame, src_mac):
        ip = ipv6.parse(frame, ethernet.HEADER_LEN)
        src = ip.src
        if self._macs.get(src) == src_mac:
            self._seen[src] = self._now
        elif src == _ZERO6:
            # DAD probes and solicitations before an address exists: NDP checks them.
            if ip.protocol != _ICMPV6:
                raise MalformedFrame("spoofed-source")
        elif src[0] == 0xFF:
            raise MalformedFrame("multicast-source")
        else:
            self._check_source(ip, src_mac, frame)
        if ip.fragmented:
            raise MalformedFrame("ipv6-fragment")
        proto = ip.protocol
        dst = ip.dst
        if proto == ipv4.PROTO_UDP:
            sport, dport, start, end = udp.parse(frame, ip)
            service = self._udp6_services.get(dport)
            if service is not None and (dst in self.owned6 or not service.local_only
                                        and dst[0] != 0xFF or dst == _ALL_DHCP_SERVERS
                                        and dport == _DHCPV6_SERVER_PORT):
                service.handle_datagram(frame, ip, sport, frame[start:end])
                return
        if dst[0] == 0xFF and proto != _ICMPV6:
            raise MalformedFrame("multicast")
        handler = self._ip6_handlers.get(proto)
        if handler is None:
            raise MalformedFrame(f"no-handler-ipv6-proto-{proto}" if proto in (6, 17, 58)
                                 else "unsupported-ipv6-protocol")
        handler.handle_ipv6(frame, ip)

    # -- the way out: the framer

    @property
    def guest_mac(self):
        """The MAC learned last (the guest's, on a link with one guest)."""
        return self.framer.guest_mac

    @guest_mac.setter
    def guest_mac(self, mac):
        """Say the configured guest address is at ``mac`` (embedders, tests)."""
        self.framer.learn(self.config.guest.packed, mac)

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

