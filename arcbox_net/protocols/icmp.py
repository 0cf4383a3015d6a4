"""ICMP: echo requests to the stack's own addresses are answered here.

Everything else goes to ``forward``, the ICMP NAT (protocols/icmp_nat.py),
which is started and stopped with this handler; without one it is dropped
and counted. The stack never forges a reply for a host it did not hear from.
"""

from collections import Counter

from zope.interface import implementer

from ..interfaces import IIPv4Handler
from ..wire import MalformedFrame, icmp, ipv4
from ..wire.checksum import ones_sum


class GatewayEcho:
    """Sans-I/O core: the reply ICMP message for an echo request, or None."""

    def __init__(self):
        self.drops = Counter()
        self.replies = 0

    def handle(self, message):
        if len(message) < 8:
            self.drops["icmp-short"] += 1
            return None
        if ones_sum(message) != 0xFFFF:
            self.drops["icmp-bad-checksum"] += 1
            return None
        if message[0] != icmp.TYPE_ECHO_REQUEST or message[1] != 0:
            self.drops["icmp-not-echo-request"] += 1
            return None
        self.replies += 1
        return icmp.echo_reply(message)


@implementer(IIPv4Handler)
class IcmpHandler:
    ip_protocol = ipv4.PROTO_ICMP

    def __init__(self, dispatcher, forward=None):
        self.dispatcher = dispatcher
        self.echo = GatewayEcho()
        #: Handler for ICMP to other addresses (the ICMP NAT), if any.
        self.forward = forward

    def start(self):
        start = getattr(self.forward, "start", None)
        if start is not None:
            start()

    def stop(self):
        stop = getattr(self.forward, "stop", None)
        if stop is not None:
            stop()

    def handle_ipv4(self, frame, ip):
        if ip.dst in self.dispatcher.owned:
            reply = self.echo.handle(ip.payload(frame))
            if reply is not None:
                self.dispatcher.framer.send_ip(ip.dst, ip.src, ipv4.PROTO_ICMP, reply)
            return
        if self.forward is None:
            raise MalformedFrame("icmp-no-route")
        self.forward.handle_ipv4(frame, ip)
