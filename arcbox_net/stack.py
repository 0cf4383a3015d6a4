"""NetworkStack: the embedding API, an IService that serves one guest link.

A Twisted program creates a link (``links.open_link`` or a link class), a
StackConfig, and a NetworkStack, then starts it like any service::

    stack = NetworkStack(TapLink.open_in_netns("vm1"), StackConfig(mtu=9000))
    stack.setServiceParent(application)   # or stack.startService()

The stack wires the dispatcher to the protocol handlers; it owns the link
and closes it when stopped. If the link dies (the VM went away) the stack
stops itself and fires ``whenLinkLost()`` Deferreds.
"""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from .config import StackConfig
from .dispatch import FrameDispatcher
from .policy import Egress
from .protocols.arp import ArpHandler
from .protocols.dhcp import DhcpHandler
from .protocols.icmp import IcmpHandler
from .wire.ethernet import mac_to_str


class NetworkStack(service.Service):
    log = Logger()

    def __init__(self, link, config=None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config or StackConfig()
        self.link = link
        self.dispatcher = FrameDispatcher(self.config, link)
        self.dispatcher.on_link_lost = self._link_lost
        self.arp = ArpHandler(self.dispatcher)
        self.dhcp = DhcpHandler(self.dispatcher, self.config, clock=reactor.seconds)
        self.icmp = IcmpHandler(self.dispatcher)
        #: Address mapping and egress policy shared by the TCP, UDP and ICMP NAT.
        self.egress = Egress(self.config)
        #: Every part with drop counters, start/stop hooks or flows to list.
        self.parts = [self.arp, self.dhcp, self.icmp]
        self._add_nat()
        self._add_dns()
        for handler in self.parts:
            self.dispatcher.register(handler)
        self._lost_waiters = []
        self.link_lost_reason = None

    def _add_nat(self):
        """Outbound NAT handlers (TCP, UDP, ICMP to other hosts)."""
        from .tcp.nat import TcpNat
        self.tcp = TcpNat(self.dispatcher, self.config, self.egress, self.reactor)
        self.parts.append(self.tcp)

    def _add_dns(self):
        """The DNS resolver proxy on the gateway."""

    def startService(self):
        super().startService()
        for part in self.parts:
            start = getattr(part, "start", None)
            if start is not None:
                start()
        self.link.start(self.dispatcher)
        self.log.info("arcbox-net serving {link}: {summary}",
                      link=self.link.description, summary=self.config.summary())

    def stopService(self):
        super().stopService()
        self.link.stop()
        for part in self.parts:
            stop = getattr(part, "stop", None)
            if stop is not None:
                stop()

    def whenLinkLost(self):
        """A Deferred that fires with the reason when the guest link dies."""
        d = defer.Deferred()
        if self.link_lost_reason is not None:
            d.callback(self.link_lost_reason)
        else:
            self._lost_waiters.append(d)
        return d

    def _link_lost(self, reason):
        self.link_lost_reason = reason
        if self.running:
            self.log.error("stopping: the guest link {link} is gone", link=self.link.description)
            self.stopService()
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(reason)

    # -- introspection

    def leases(self):
        """Current DHCP leases as dicts (mac, address, expiry, state)."""
        return [
            {"mac": mac_to_str(lease.mac), "address": str(lease.address),
             "expiry": lease.expiry, "state": lease.state}
            for lease in self.dhcp.core.leases()
        ]

    def stats(self):
        drops = dict(self.dispatcher.drops)
        counters = {}
        sources = [self.icmp.echo, getattr(self.icmp, "forward", None)]
        for part in self.parts:
            sources += [part, getattr(part, "core", None)]
        for source in dict.fromkeys(s for s in sources if s is not None):
            for reason, n in getattr(source, "drops", {}).items():
                drops[reason] = drops.get(reason, 0) + n
            for name, n in getattr(source, "counters", {}).items():
                counters[name] = counters.get(name, 0) + n
        return {
            "counters": counters,
            "frames_in": self.dispatcher.frames_in,
            "frames_out": self.dispatcher.frames_out,
            "drops": drops,
            "link": {"description": self.link.description,
                     "queued_frames": getattr(self.link, "queued_frames", 0)},
            "guest_mac": mac_to_str(self.dispatcher.guest_mac) if self.dispatcher.guest_mac else None,
        }
