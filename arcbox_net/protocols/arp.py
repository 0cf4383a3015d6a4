"""ARP responder for the addresses the stack owns (gateway, DNS).

The guest must resolve the gateway's MAC before it sends anything routed;
every other address is off-link for it, so this is all the ARP needed.
Gratuitous ARP and requests for other addresses are counted, not answered.
"""

from collections import Counter

import dpkt
from zope.interface import implementer

from ..interfaces import IEthernetHandler
from ..wire import ethernet


class ArpResponder:
    """Sans-I/O core: ``handle(frame) -> (destination MAC, ARP reply) or None``."""

    def __init__(self, owned_addresses, mac):
        self.owned = {a if isinstance(a, bytes) else a.packed for a in owned_addresses}
        self.mac = mac
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
        if arp.op != dpkt.arp.ARP_OP_REQUEST:
            self.drops["arp-not-request"] += 1
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
        self.core = ArpResponder(dispatcher.owned, dispatcher.gateway_mac)

    def handle_frame(self, frame):
        reply = self.core.handle(frame)
        if reply is not None:
            dst_mac, body = reply
            self.framer.send_ethernet(dst_mac, ethernet.ETHERTYPE_ARP, body)
