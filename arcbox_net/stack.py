"""NetworkStack: the embedding API, an IService that serves one guest link.

A Twisted program creates a link (``links.open_link`` or a link class), a
StackConfig, and a NetworkStack, then starts it like any service::

    stack = NetworkStack(TapLink.open_in_netns("vm1"), StackConfig(mtu=9000))
    stack.setServiceParent(application)   # or stack.startService()

The stack wires the dispatcher to the protocol handlers; it owns the link
and closes it when stopped. If the link dies (the VM went away) the stack
stops itself and fires ``whenLinkLost()`` Deferreds.
"""

from ipaddress import ip_address

from twisted.application import service
from twisted.internet.defer import FirstError
from twisted.internet import defer
from twisted.logger import Logger

from .config import StackConfig
from .dispatch import FrameDispatcher
from .policy import Egress
from .protocols.arp import ArpHandler
from .protocols.dhcp import DhcpHandler
from .protocols.icmp import IcmpHandler
from .ratelimit import LimitedLog, suppressed_total
from .wire.ethernet import mac_to_str

#: Lines a guest can cause over and over (leases from made-up MACs), rate-limited.
_limited_log = LimitedLog(Logger(namespace=__name__))


class NetworkStack(service.Service):
    log = Logger()
    #: Worker processes of a multi-queue TAP use a dispatcher that relays.
    dispatcher_class = FrameDispatcher

    def __init__(self, link, config=None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config or StackConfig()
        self.link = link
        self.dispatcher = self.dispatcher_class(self.config, link)
        self.dispatcher.on_link_lost = self._link_lost
        mac = getattr(link, "guest_mac", None)
        if mac:
            # The link gave the guest its address (--netns --configure): that
            # address is this MAC's for good, before any frame claims it.
            self.dispatcher.neighbours.bind(self.config.guest.packed, mac, float("inf"))
        self.arp = ArpHandler(self.dispatcher)
        self.dhcp = DhcpHandler(self.dispatcher, self.config, clock=reactor.seconds)
        self.icmp = IcmpHandler(self.dispatcher)
        #: Address mapping and egress policy shared by the TCP, UDP and ICMP NAT.
        self.egress = Egress(self.config)
        #: Every part with drop counters, start/stop hooks or flows to list.
        self.parts = [self.arp, self.dhcp, self.icmp]
        self._add_ipv6()
        self._add_nat()
        self._add_dns()
        for handler in self.parts:
            self.dispatcher.register(handler)
        self._lost_waiters = []
        self.link_lost_reason = None
        self._subscribers = []
        self.dhcp.core.on_lease = self._lease_granted
        self._chain_bindings()
        # The TCP NAT describes connections only while someone listens.
        self.tcp.on_event = None
        from .forward import ForwardManager
        self.forwarder = ForwardManager(self, self.config.forward_source)
        from .protocols.udp_nat import UdpForwarder
        self.udp_forwarder = UdpForwarder(self)
        self._forwards_started = False
        #: multiqueue.QueueWorkers serving the link's other queues, if it has any.
        self.queue_workers = None
        self._ready = None
        self._ready_error = None

    def _add_ipv6(self):
        """NDP and router advertisements, DHCPv6, ICMPv6 echo to the gateway."""
        self.icmp6 = self.dhcp6 = None
        if not self.config.ipv6:
            return
        from .protocols.dhcpv6 import Dhcpv6Handler
        from .protocols.icmpv6 import Icmpv6Handler
        from .protocols.ndp import NdpHandler
        ndp = NdpHandler(self.dispatcher, self.config, self.reactor)
        self.icmp6 = Icmpv6Handler(self.dispatcher, ndp)
        self.dhcp6 = Dhcpv6Handler(self.dispatcher, self.config, clock=self.reactor.seconds)
        self.parts += [self.icmp6, self.dhcp6]

    def _add_nat(self):
        """Outbound NAT handlers (TCP, UDP, ICMP to other hosts)."""
        from .fdbudget import FdBudget
        from .tcp.nat import TcpNat
        #: Host descriptors the guest may make us hold; sized at start.
        self.fd_budget = FdBudget()
        self.tcp = TcpNat(self.dispatcher, self.config, self.egress, self.reactor,
                          fd_budget=self.fd_budget)
        self.parts.append(self.tcp)
        # UDP NAT (a dispatch handler) and ICMP echo NAT (IcmpHandler's forward,
        # started and stopped by it: not a second handler for IP protocol 1).
        from .protocols.icmp_nat import IcmpNat
        from .protocols.udp_nat import UdpNat
        self.udp = UdpNat(self.dispatcher, self.config, self.egress, self.reactor,
                          fd_budget=self.fd_budget)
        self.fd_budget.add_user(lambda: len(self.tcp.connections))
        self.fd_budget.add_user(lambda: len(self.udp.table))
        self.parts.append(self.udp)
        self.icmp.forward = IcmpNat(self.dispatcher, self.config, self.egress, self.reactor)
        if self.icmp6 is not None:
            self.icmp6.forward = self.icmp.forward    # one NAT for both families

    def _add_dns(self):
        """The DNS resolver proxy on the gateway."""
        from .protocols.dns import DnsHandler
        self.dns = DnsHandler(self.dispatcher, self.config, self.egress, self.reactor)
        self.parts.append(self.dns)

    def startService(self):
        super().startService()
        if not self._forwards_started:
            self.start_forwards().addErrback(
                lambda f: self.log.error("port forwarding: {error}", error=_first_error(f)))
        for part in self.parts:
            start = getattr(part, "start", None)
            if start is not None:
                start()
        self._size_fd_budget()
        self.link.start(self.dispatcher)
        self._start_queue_workers()
        self.log.info("arcbox-net serving {link}: {summary}",
                      link=self.link.description, summary=self.config.summary())

    def _size_fd_budget(self):
        """After the TCP NAT raised the descriptor limit: what the guest may use."""
        from .fdbudget import FdBudget
        self.fd_budget.capacity = FdBudget.for_process().capacity
        table = getattr(getattr(self.icmp, "forward", None), "table", None)
        if table is not None:      # ICMP echo flows: a ping socket each
            self.fd_budget.add_user(table.__len__)

    def _start_queue_workers(self):
        extra = getattr(self.link, "extra_queues", None)
        if not extra:
            self._ready = defer.succeed(None)
            return
        from .multiqueue.supervisor import QueueWorkers
        caps = self.link.capabilities
        if caps.vnet_header_len:
            kind = ("vnet-offload6" if caps.gso_tcpv6 else "vnet-offload") if caps.gso_tcpv4 \
                else "vnet"
        else:
            kind = "plain"
        self.link.extra_queues = []  # the workers own them from here
        dispatcher = self.dispatcher
        self.queue_workers = QueueWorkers(
            self.config, extra, self.reactor,
            relay=lambda frame: dispatcher.frames_received([frame]), emit=self.emit,
            capture=lambda: dispatcher.capture, lost=self._link_lost, link_kind=kind,
            busy_poll=getattr(self.reactor, "busy_poll", 0.0),
            options={"events": bool(self._subscribers),
                     "capture": dispatcher.capture is not None,
                     "bindings": self._bindings_json()})
        self._ready = self.queue_workers.start()
        self._ready.addCallback(lambda _: self.log.info(
            "{n} queue worker(s) serving", n=len(extra)))

        def failed(failure):
            self._ready_error = _first_error(failure)
            self.log.error("stopping: {reason}", reason=self._ready_error)
            self._link_lost(self._ready_error)
        self._ready.addErrback(failed)

    def whenReady(self):
        """A Deferred that fires once every queue is served (at once with one
        queue); it fails (RuntimeError) if a queue worker could not start."""
        if self._ready is None:
            return defer.fail(RuntimeError("the stack is not started"))
        d = defer.Deferred()

        def fire(_):
            if self._ready_error is not None:
                d.errback(RuntimeError(self._ready_error))
            else:
                d.callback(None)
        self._ready.addCallback(fire)
        return d

    def stopService(self):
        super().stopService()
        self.forwarder.stop()
        self.udp_forwarder.stop()
        if self.queue_workers is not None:
            self.queue_workers.stop()
        if self.icmp6 is not None:
            self.icmp6.stop()    # the last RA (router lifetime 0) leaves before the link closes
        self.link.stop()
        self.stop_capture()
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

    # -- port forwarding

    def start_forwards(self):
        """Bind the configured forwards; the Deferred fails on the first error."""
        self._forwards_started = True
        return defer.gatherResults([self.forwarder.add(spec) for spec in self.config.forwards],
                                   consumeErrors=True)

    def add_forward(self, spec):
        """Add a forward (a ForwardSpec or "tcp:8080:80"); Deferred of its JSON dict.

        Fails with arcbox_net.forward.ForwardError (message and HTTP status).
        """
        return self.forwarder.add(spec).addCallback(lambda forward: forward.to_json())

    def remove_forward(self, forward_id):
        """Close a forward's listener (open connections go on); Deferred of None."""
        return self.forwarder.remove(forward_id)

    def forwards(self):
        return self.forwarder.list()

    # -- events

    def subscribe(self, callback):
        """Call ``callback(kind, details)`` for each event; returns an unsubscribe function.

        Kinds: "lease-granted", "connection-opened", "connection-closed",
        "forward-added", "forward-removed". ``details`` is a JSON-able dict.
        """
        self._subscribers.append(callback)
        self.tcp.on_event = self.emit
        if self.queue_workers is not None:
            self.queue_workers.set_options(events=True)

        def unsubscribe():
            if callback in self._subscribers:
                self._subscribers.remove(callback)
            if not self._subscribers:
                self.tcp.on_event = None
                if self.queue_workers is not None:
                    self.queue_workers.set_options(events=False)
        return unsubscribe

    def emit(self, kind, details):
        for callback in list(self._subscribers):
            try:
                callback(kind, details)
            except Exception:
                _limited_log.failure("event subscriber failed on {kind}", kind=kind)

    def _chain_bindings(self):
        """Queue workers validate guest sources too but see no DHCP: tell them
        each lease binding the neighbour table gains or loses."""
        core = self.dhcp.core
        bind, unbind = core.on_bind, core.on_unbind

        def on_bind(lease):
            bind(lease)
            self._bindings_changed()

        def on_unbind(lease):
            unbind(lease)
            self._bindings_changed()
        core.on_bind, core.on_unbind = on_bind, on_unbind

    def _bindings_json(self):
        framer = self.dispatcher.framer
        return [[str(ip_address(a)), mac_to_str(m), left]
                for a, m, left in framer.neighbours.bindings(framer.clock())]

    def _bindings_changed(self):
        if self.queue_workers is not None:
            self.queue_workers.set_options(bindings=self._bindings_json())

    def _lease_granted(self, lease):
        details = {"mac": mac_to_str(lease.mac), "address": str(lease.address),
                   "expiry": lease.expiry}
        _limited_log.info("lease {address} granted to {mac}", **details)
        self.emit("lease-granted", details)

    # -- packet capture

    def start_capture(self, path, exclusive=False):
        """Write every frame, both ways, to a pcap file at ``path`` (OSError if it
        cannot be created; RuntimeError if a capture is already running).
        ``exclusive``: only create a new file (no truncation, no symlinks)."""
        from .pcap import PcapCapture
        current = self.dispatcher.capture
        if current is not None and current.active:
            raise RuntimeError(f"a capture to {current.path} is already running")
        self.dispatcher.capture = PcapCapture(path, exclusive=exclusive)
        if self.queue_workers is not None:
            self.queue_workers.set_options(capture=True)
        self.log.info("capturing guest frames to {path}", path=str(path))
        return self.dispatcher.capture

    def stop_capture(self):
        """Stop the running capture; return its stats dict, or None if there was none."""
        capture, self.dispatcher.capture = self.dispatcher.capture, None
        if capture is None:
            return None
        if self.queue_workers is not None:
            self.queue_workers.set_options(capture=False)
        capture.close()
        return capture.stats()

    # -- introspection

    def connections(self):
        """Every TCP connection and UDP flow: 4-tuple, state, bytes each way, age."""
        flows = []
        for part in [*self.parts, getattr(self.icmp, "forward", None), self.udp_forwarder]:
            if part is not None and hasattr(part, "flows"):
                flows.extend(part.flows())
        if self.queue_workers is not None:
            flows.extend(self.queue_workers.connections())
        return flows

    def leases(self):
        """Current DHCP and DHCPv6 leases as dicts (mac, address, expiry, state)."""
        leases = [
            {"mac": mac_to_str(lease.mac), "address": str(lease.address),
             "expiry": lease.expiry, "state": lease.state}
            for lease in self.dhcp.core.leases()
        ]
        if self.dhcp6 is not None:
            leases += [
                {"mac": mac_to_str(b.mac) if b.mac else None, "address": str(b.address),
                 "expiry": b.expiry, "state": b.state, "duid": b.duid.hex(), "iaid": b.iaid}
                for b in self.dhcp6.core.bindings()
            ]
        return leases

    def stats(self):
        drops = dict(self.dispatcher.drops)
        counters = {}
        sources = [self.dispatcher.framer, self.dispatcher.neighbours, self.icmp.echo,
                   getattr(self.icmp, "forward", None), self.link]
        for part in self.parts:
            sources += [part, getattr(part, "core", None)]
        for source in dict.fromkeys(s for s in sources if s is not None):
            for reason, n in getattr(source, "drops", {}).items():
                drops[reason] = drops.get(reason, 0) + n
            for name, n in getattr(source, "counters", {}).items():
                counters[name] = counters.get(name, 0) + n
        if suppressed_total():
            counters["log-lines-suppressed"] = suppressed_total()
        stats = {
            "counters": counters,
            "frames_in": self.dispatcher.frames_in,
            "frames_out": self.dispatcher.frames_out,
            "drops": drops,
            "link": {"description": self.link.description,
                     "queued_frames": getattr(self.link, "queued_frames", 0)},
            "guest_mac": mac_to_str(self.dispatcher.guest_mac) if self.dispatcher.guest_mac else None,
            "fds": self.fd_budget.to_json(),
            "neighbours": {str(ip_address(a)): mac_to_str(m)
                           for a, m in self.dispatcher.neighbours.entries()},
        }
        if self.queue_workers is not None:
            self.queue_workers.merge_stats(stats)
        return stats


def _first_error(failure):
    if failure.check(FirstError):
        failure = failure.value.subFailure
    return failure.getErrorMessage()
