"""Command-line options of ``twistd arcbox-net`` and the service they make."""

import os
import sys

from twisted.python import usage

from .config import ConfigError, StackConfig


def _int(name):
    def convert(value):
        try:
            return int(value)
        except ValueError:
            raise usage.UsageError(f"{name} takes a whole number, not {value!r}") from None
    return convert


class Options(usage.Options):
    synopsis = "[options] (--fd N | --tap NAME | --netns NAME|PATH)"
    longdesc = ("Serve a guest network (DHCP, ARP, DNS, NAT) on a frame link. "
                "Exactly one of --fd, --tap, --netns chooses the link.")

    optFlags = [
        ["configure", None, "With --netns: give the TAP the guest address, default route "
                            "and MTU directly (no DHCP needed)."],
    ]
    optParameters = [
        ["fd", None, None, "Inherited connected socket (SOCK_DGRAM or SOCK_SEQPACKET) "
                           "carrying one Ethernet frame per datagram.", _int("--fd")],
        ["tap", None, None, "Attach to (or create) this TAP device in the current namespace."],
        ["netns", None, None, "Create the TAP inside this network namespace (a name under "
                              "/var/run/netns or a path such as /proc/PID/ns/net)."],
        ["tap-name", None, "tap0", "Name of the TAP created with --netns."],
        ["subnet", None, "10.0.2.0/24", "Guest subnet."],
        ["gateway", None, "10.0.2.1", "Gateway address (also the DNS server)."],
        ["guest", None, "10.0.2.2", "First guest address (the default guest's lease)."],
        ["dns", None, None, "DNS server announced by DHCP (default: the gateway)."],
        ["mtu", None, 1500, "Link MTU, 576..65520.", _int("--mtu")],
        ["domain", None, None, "Domain name announced by DHCP (option 15)."],
        ["lease-time", None, 3600, "DHCP lease time in seconds.", _int("--lease-time")],
        ["mac", None, "02:ab:cb:00:00:01", "MAC address of the gateway."],
        ["ready-fd", None, None, "Write one byte to this fd when serving, then close it.",
         _int("--ready-fd")],
    ]

    def __init__(self):
        super().__init__()
        self["search"] = []
        self["static_leases"] = []

    def opt_search(self, domain):
        """Domain search list entry announced by DHCP (option 119); repeatable."""
        self["search"].append(domain)

    def opt_static_lease(self, spec):
        """MAC=ADDRESS: always lease ADDRESS to MAC; repeatable."""
        mac, sep, address = spec.partition("=")
        if not sep:
            raise usage.UsageError(f"--static-lease takes MAC=ADDRESS, not {spec!r}")
        self["static_leases"].append((mac, address))

    def parseOptions(self, options=None):
        """One line on stderr and exit 2 for any bad option (not a usage dump)."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write(f"arcbox-net: {e}\n")
            raise SystemExit(2)

    def postOptions(self):
        try:
            self.config = StackConfig(
                subnet=self["subnet"], gateway=self["gateway"], guest=self["guest"],
                dns=self["dns"], mtu=self["mtu"], domain=self["domain"],
                search=self["search"], lease_time=self["lease-time"],
                gateway_mac=self["mac"], static_leases=self["static_leases"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["configure"] and self["netns"] is None:
            raise usage.UsageError("--configure only applies to --netns")
        links = [o for o in ("fd", "tap", "netns") if self[o] is not None]
        if len(links) != 1:
            raise usage.UsageError("give exactly one of --fd, --tap, --netns")
        if self["ready-fd"] is not None:
            try:
                os.fstat(self["ready-fd"])
            except OSError:
                raise usage.UsageError(f"--ready-fd {self['ready-fd']} is not an open fd") from None


def make_service(options):
    """Open the link and build the stack; exit with one line if that fails."""
    from twisted.internet import reactor

    from .link import open_link
    from .link.tap import TapError
    from .stack import NetworkStack

    try:
        link = open_link(options.config, fd=options["fd"], tap=options["tap"],
                         netns=options["netns"], tap_name=options["tap-name"],
                         configure=options["configure"])
    except (TapError, ValueError, OSError) as e:
        sys.stderr.write(f"arcbox-net: {e}\n")
        raise SystemExit(1)
    stack = NetworkStack(link, options.config, reactor=reactor)

    def link_lost(_reason):
        if reactor.running:
            reactor.stop()

    stack.whenLinkLost().addCallback(link_lost)
    ready_fd = options["ready-fd"]
    if ready_fd is not None:
        def signal_ready():
            try:
                os.write(ready_fd, b"1")
            finally:
                os.close(ready_fd)
        reactor.callWhenRunning(signal_ready)
    return stack

makeService = make_service
