"""ARP: the responder for the addresses the stack owns (gateway, DNS), and
the neighbour table's source of guest MACs.

The guest must resolve the gateway's MAC before it sends anything routed;
every other address is off-link for it, so answering for the owned
addresses is all the replying needed. Requests and replies from the guest
also tell the gateway which MAC has which address: the sender is learned
only when its address is one the stack leased or configured for that MAC
(neighbours.py), so an ARP probe or a spoofer's "I am 10.0.2.2" cannot
redirect another address's traffic. Requests for other addresses are
counted, not answered.
"""

from collections import Counter

import dpkt
from zope.interface import implementer

from ..interfaces import IEthernetHandler
from ..wire import ethernet


class ArpResponder:
    """Sans-I/O core: ``handle(frame) -> (destination MAC, ARP reply) or None``."""

    def __init__(self, owned_addresses, mac, learn=None):
        self.owned = {a if isinstance(a, bytes) else a.packed for a in owned_addresses}
        self.mac = mac
        #: Callable(address, mac) -> bool: is the sender's claim valid (and
        #: then recorded)? None: learn nothing.
        self.learn = learn
        self.drops = Counter()
        self.replies = 0

    def handle(self, frame):
        try:
            eth = dpkt.ethernet.Ethernet(bytes(frame))
            arp = eth.data
            if not isinstance(arp, dpkt.arp.ARP):
                raise dpkt.UnpackError("not ARP")
        except (dpkt.UnpackError, dpkt.NeedData, ValueError, TypeError):
            self.drops["arp-malformed"] += 1
            return None
        if arp.hrd != dpkt.arp.ARP_HRD_ETH or arp.pro != dpkt.arp.ARP_PRO_IP \
                or arp.hln != 6 or arp.pln != 4:
            self.drops["arp-unsupported"] += 1
            return None
        if arp.op not in (dpkt.arp.ARP_OP_REQUEST, dpkt.arp.ARP_OP_REPLY):
            self.drops["arp-unsupported"] += 1
            return None
        if self.learn is not None and arp.spa != b"\x00\x00\x00\x00" \
                and arp.spa not in self.owned:
            if arp.sha != eth.src or not self.learn(arp.spa, arp.sha):
                self.drops["arp-spoofed-sender"] += 1
        if arp.op != dpkt.arp.ARP_OP_REQUEST:
            return None
        if arp.tpa not in self.owned or arp.tpa == arp.spa:
            self.drops["arp-not-ours"] += 1
            return None
        reply = dpkt.arp.ARP(
            hrd=dpkt.arp.ARP_HRD_ETH, pro=dpkt.arp.ARP_PRO_IP, hln=6, pln=4,
            op=dpkt.arp.ARP_OP_REPLY, sha=self.mac, spa=arp.tpa, tha=arp.sha, tpa=arp.spa)
        self.replies += 1
        return arp.sha, bytes(reply)


@implementer(IEthernetHandler)
class ArpHandler:
    ethertype = ethernet.ETHERTYPE_ARP

    def __init__(self, dispatcher):
        self.framer = dispatcher.framer
        self.core = ArpResponder(dispatcher.owned, dispatcher.gateway_mac,
                                 self.framer.learn_claim)

    def handle_frame(self, frame):
        reply = self.core.handle(frame)
        if reply is not None:
            dst_mac, body = reply
            self.framer.send_ethernet(dst_mac, ethernet.ETHERTYPE_ARP, body)
