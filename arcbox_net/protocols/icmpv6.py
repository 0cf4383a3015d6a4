"""ICMPv6 from the guest: NDP, echo to the gateway, the rest to the NAT.

ICMPv6 is one IP protocol carrying three jobs. Neighbour discovery (types
133-137) goes to ``NdpHandler`` (protocols/ndp.py); echo requests to the
stack's own addresses (fd00::1, fe80::1) are answered here; other echo
requests go to ``forward``, the ICMP NAT (protocols/icmp_nat.py) when it
serves IPv6, else they are dropped and counted. Errors and MLD reports
from the guest are counted and dropped: the stack is the only router and
keeps no multicast state. Every reply is a real one: nothing is forged for
a host the stack did not hear from.
"""

from collections import Counter

from zope.interface import implementer

from ..interfaces import IIPv6Handler
from ..wire import MalformedFrame, icmpv6

_NDP_TYPES = frozenset(range(icmpv6.TYPE_ROUTER_SOLICIT, icmpv6.TYPE_REDIRECT + 1))
#: MLDv1 query/report/done and the MLDv2 report (RFC 3810).
_MLD_TYPES = frozenset((icmpv6.TYPE_MLD_QUERY, icmpv6.TYPE_MLD_REPORT, icmpv6.TYPE_MLD_DONE, 143))


class GatewayEcho6:
    """Sans-I/O core: the echo reply for a request to an owned address, or None."""

    def __init__(self):
        self.drops = Counter()
        self.replies = 0

    def handle(self, src, dst, message):
        """``src``/``dst`` of the request; the reply goes from ``dst`` to ``src``."""
        if len(message) < 8:
            self.drops["icmpv6-short"] += 1
            return None
        if not icmpv6.verify(src, dst, message):
            self.drops["icmpv6-bad-checksum"] += 1
            return None
        if message[1] != 0:
            self.drops["icmpv6-bad-code"] += 1
            return None
        self.replies += 1
        return icmpv6.echo_reply(dst, src, message)


@implementer(IIPv6Handler)
class Icmpv6Handler:
    ip_protocol = icmpv6.NH_ICMPV6

    def __init__(self, dispatcher, ndp, forward=None):
        self.dispatcher = dispatcher
        self.framer = dispatcher.framer
        self.ndp = ndp
        self.echo = GatewayEcho6()
        #: Handler for echo to other addresses (the ICMP NAT), if any.
        self.forward = forward

    def start(self):
        self.ndp.start()

    def stop(self):
        self.ndp.stop()

    def handle_ipv6(self, frame, ip):
        if ip.payload_end - ip.payload_offset < 4:
            raise MalformedFrame("short-icmpv6")
        kind = frame[ip.payload_offset]
        if kind in _NDP_TYPES:
            self.ndp.handle_ipv6(frame, ip)
            return
        if kind == icmpv6.TYPE_ECHO_REQUEST and ip.dst in self.dispatcher.owned6:
            reply = self.echo.handle(ip.src, ip.dst, bytes(ip.payload(frame)))
            if reply is not None:
                self.framer.send_ip(ip.dst, ip.src, icmpv6.NH_ICMPV6, reply)
            return
        if kind in _MLD_TYPES:
            raise MalformedFrame("icmpv6-mld")
        if kind != icmpv6.TYPE_ECHO_REQUEST:
            raise MalformedFrame("icmpv6-error-from-guest" if icmpv6.is_error(kind)
                                 else "icmpv6-unsupported-type")
        if ip.dst[0] == 0xFF:
            raise MalformedFrame("multicast")
        handle = getattr(self.forward, "handle_ipv6", None)
        if handle is None:
            raise MalformedFrame("icmpv6-no-route")
        handle(frame, ip)

    @property
    def drops(self):
        return self.echo.drops + self.ndp.drops

    @property
    def counters(self):
        return Counter({"ndp-replies": self.ndp.core.replies, "ra-sent": self.ndp.advertiser.sent,
                        "icmpv6-echo-replies": self.echo.replies})
