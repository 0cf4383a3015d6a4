"""Command-line options of ``twistd arcbox-net`` and the service they make."""

import os
import sys

from twisted.python import usage

from .config import ConfigError, StackConfig
from .reactor import BUSY_POLL_MAX

#: --busy-poll's default, in microseconds: KVM's default halt-poll window.
DEFAULT_BUSY_POLL_US = 200
MAX_BUSY_POLL_US = round(BUSY_POLL_MAX * 1e6)


def _int(name):
    def convert(value):
        try:
            return int(value)
        except ValueError:
            raise usage.UsageError(f"{name} takes a whole number, not {value!r}") from None
    return convert


class Options(usage.Options):
    synopsis = ("[options] (--fd N | --tap NAME | --netns NAME|PATH | --listen-stream PATH | "
                "--connect-stream PATH | --listen-dgram PATH | --vhost-user PATH)")
    longdesc = ("Serve a guest network (DHCP, ARP, DNS, NAT) on a frame link. "
                "Exactly one of --fd, --tap, --netns, --listen-stream, --connect-stream, "
                "--listen-dgram, --vhost-user chooses the link.")

    optFlags = [
        ["configure", None, "With --netns: give the TAP the guest address, default route "
                            "and MTU directly (no DHCP needed)."],
        ["no-offload", None, "TAP links: do not enable checksum/TSO offload (virtio-net "
                             "headers); every frame is then at most the MTU."],
        ["no-host-loopback", None, "Do not connect traffic for the gateway address to the "
                                   "host's 127.0.0.1."],
        ["allow-any-source", None, "Take guest frames from any source address (default: "
                                   "only the address leased or configured for the sending "
                                   "MAC; others are dropped and counted)."],
        ["no-ipv6", None, "No IPv6 on the guest link (no router advertisements, NDP, "
                          "DHCPv6 or IPv6 NAT); IPv6 frames are dropped and counted."],
        ["no-tcp-timestamps", None, "Do not offer or accept TCP timestamps (RFC 7323) with "
                                    "the guest (12 more payload bytes per segment)."],
        ["vnet-hdr", None, "With --fd (datagram or seqpacket): each datagram starts with a "
                           "virtio_net_hdr_v1 (12 bytes), so TSO frames up to 64 KiB and "
                           "partial checksums cross the socket both ways."],
    ]
    optParameters = [
        ["fd", None, None, "Inherited connected socket: SOCK_DGRAM or SOCK_SEQPACKET (one "
                           "Ethernet frame per datagram) or SOCK_STREAM (4-byte big-endian "
                           "length before each frame).", _int("--fd")],
        ["listen-stream", None, None, "Listen on this unix stream socket (mode 0600) for one "
                                      "peer at a time, frames with a 4-byte length (QEMU "
                                      "-netdev stream server=off, passt, gvproxy qemu)."],
        ["connect-stream", None, None, "Connect to this unix stream socket (QEMU -netdev "
                                       "stream server=on); the stack exits when it closes."],
        ["listen-dgram", None, None, "Bind this unix datagram socket (mode 0600), one frame "
                                     "per datagram; replies go to the latest sender (QEMU "
                                     "-netdev dgram, vfkit unixSocketPath)."],
        ["vhost-user", None, None, "Listen on this unix socket (mode 0600) as a vhost-user "
                                   "net back-end, one QEMU at a time (-chardev socket,path=PATH "
                                   "-netdev vhost-user; guest RAM must be shared memory)."],
        ["pcap", None, None, "Write every frame, both ways, to this pcap file."],
        ["tap", None, None, "Attach to (or create) this TAP device in the current namespace."],
        ["netns", None, None, "Create the TAP inside this network namespace (a name under "
                              "/var/run/netns or a path such as /proc/PID/ns/net)."],
        ["tap-name", None, "tap0", "Name of the TAP created with --netns."],
        ["queues", None, 1, "TAP links: open the TAP multi-queue with this many queues, "
                            "each served by its own process (1..16). Connections the guest "
                            "opens are spread over them, so several busy ones use several "
                            "CPUs.", _int("--queues")],
        ["subnet", None, "10.0.2.0/24", "Guest subnet."],
        ["gateway", None, "10.0.2.1", "Gateway address (also the DNS server)."],
        ["guest", None, "10.0.2.2", "First guest address (the default guest's lease)."],
        ["dns", None, None, "DNS server announced by DHCP (default: the gateway)."],
        ["ipv6-subnet", None, "fd00::/64", "Guest IPv6 prefix, announced by router "
                                           "advertisements; its ::1 is the gateway and DNS "
                                           "server, ::2 the first DHCPv6 address."],
        ["mtu", None, 1500, "Link MTU, 576..65520.", _int("--mtu")],
        ["domain", None, None, "Domain name announced by DHCP (option 15)."],
        ["lease-time", None, 3600, "DHCP lease time in seconds.", _int("--lease-time")],
        ["mac", None, "02:ab:cb:00:00:01", "MAC address of the gateway."],
        ["connect-timeout", None, 10.0, "Seconds a guest TCP SYN waits for the host connect.",
         float],
        ["max-connections", None, 4096, "Concurrent TCP connections; beyond it SYNs get RST.",
         _int("--max-connections")],
        ["max-half-open", None, 256, "Guest TCP connections still opening (host connect or "
                                     "handshake pending) at once; beyond it SYNs get RST.",
         _int("--max-half-open")],
        ["tcp-fin-timeout", None, 60.0, "Seconds a TCP connection the host closed waits in "
                                        "FIN_WAIT_2 for more guest data or the guest's FIN.",
         float],
        ["tcp-close-wait-timeout", None, 300.0, "Seconds a TCP connection the guest closed "
                                                "waits in CLOSE_WAIT for host data or EOF.",
         float],
        ["udp-timeout", None, 60.0, "Idle timeout of a UDP flow, in seconds.", float],
        ["max-udp-flows", None, 1024, "Concurrent UDP flows; beyond it the oldest idle flow "
                                      "is evicted.", _int("--max-udp-flows")],
        ["dns-timeout", None, 5.0, "Seconds before an unanswered upstream DNS query "
                                   "becomes SERVFAIL.", float],
        ["forward-source", None, "gateway", "Source address the guest sees on forwarded "
                                            "connections: gateway, or preserve (the host "
                                            "client's address when it is not loopback)."],
        ["busy-poll", None, None, "Adaptive polling: poll for up to this many microseconds "
                                  "before sleeping while events keep coming that fast "
                                  "(shorter request/response round trips for some CPU; "
                                  f"default {DEFAULT_BUSY_POLL_US}, 0 turns it off, at most "
                                  f"{MAX_BUSY_POLL_US}). Only with arcbox-net's own reactor "
                                  "(no -r).",
         _int("--busy-poll")],
        ["api", None, None, "Serve the HTTP/JSON control API on this unix socket (mode 0600)."],
        ["ready-fd", None, None, "Write one byte to this fd when serving, then close it.",
         _int("--ready-fd")],
    ]

    def __init__(self):
        super().__init__()
        self["search"] = []
        self["static_leases"] = []
        self["maps"] = []
        self["allow"] = []
        self["deny"] = []
        self["dns_upstreams"] = []
        self["dns_records"] = []
        self["forwards"] = []

    def opt_search(self, domain):
        """Domain search list entry announced by DHCP (option 119); repeatable."""
        self["search"].append(domain)

    def opt_static_lease(self, spec):
        """MAC=ADDRESS: always lease ADDRESS to MAC; repeatable."""
        mac, sep, address = spec.partition("=")
        if not sep:
            raise usage.UsageError(f"--static-lease takes MAC=ADDRESS, not {spec!r}")
        self["static_leases"].append((mac, address))

    # The docstrings of opt_* methods are twistd's help texts, printed with
    # their whitespace as it is: long ones are joined literals, not indented lines.

    def opt_map(self, spec):
        ("VIRTUAL=HOST: traffic to guest-visible VIRTUAL goes to host address HOST "
         "(e.g. 203.0.113.10=127.0.0.2 or 2001:db8::10=::1); repeatable.")
        if "=" not in spec:
            raise usage.UsageError(f"--map takes VIRTUAL=HOST, not {spec!r}")
        self["maps"].append(spec)

    def opt_allow(self, cidr):
        """Let the guest reach this IPv4 or IPv6 CIDR (host address, after --map); repeatable."""
        self["allow"].append(cidr)

    def opt_deny(self, cidr):
        ("Keep the guest from this CIDR (most specific rule wins; 169.254.0.0/16 "
         "is denied by default); repeatable.")
        self["deny"].append(cidr)

    def opt_forward(self, spec):
        ("PROTO:[BIND_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT: forward a host port into the "
         "guest (PROTO tcp or udp; BIND_ADDR default 127.0.0.1; GUEST_ADDR default the "
         "leased guest address; IPv6 addresses in brackets, tcp:[::1]:8080:[fd00::2]:80); "
         "repeatable.")
        self["forwards"].append(spec)

    def opt_dns_upstream(self, spec):
        ("ADDR[:PORT] or [IPV6]:PORT of an upstream DNS server (default: the host's "
         "/etc/resolv.conf); repeatable.")
        self["dns_upstreams"].append(spec)

    def opt_dns_record(self, spec):
        ("NAME=ADDR: answer NAME with ADDR from the gateway's DNS (A for an IPv4 "
         "address, AAAA for an IPv6 one); repeatable.")
        if "=" not in spec:
            raise usage.UsageError(f"--dns-record takes NAME=ADDR, not {spec!r}")
        self["dns_records"].append(spec)

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
                gateway_mac=self["mac"], static_leases=self["static_leases"],
                host_loopback=not self["no-host-loopback"], address_map=self["maps"],
                allow_any_source=bool(self["allow-any-source"]),
                allow=self["allow"], deny=["169.254.0.0/16", *self["deny"]],
                connect_timeout=self["connect-timeout"],
                max_connections=self["max-connections"], udp_timeout=self["udp-timeout"],
                max_half_open=self["max-half-open"], tcp_fin_timeout=self["tcp-fin-timeout"],
                tcp_close_wait_timeout=self["tcp-close-wait-timeout"],
                tcp_timestamps=not self["no-tcp-timestamps"],
                max_udp_flows=self["max-udp-flows"], dns_upstreams=self["dns_upstreams"],
                dns_records=self["dns_records"], dns_timeout=self["dns-timeout"],
                forwards=self["forwards"], forward_source=self["forward-source"],
                ipv6=not self["no-ipv6"], ipv6_subnet=self["ipv6-subnet"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["busy-poll"] is not None and not 0 <= self["busy-poll"] <= MAX_BUSY_POLL_US:
            raise usage.UsageError(f"--busy-poll takes 0..{MAX_BUSY_POLL_US} microseconds, "
                                   f"not {self['busy-poll']}")
        if self["configure"] and self["netns"] is None:
            raise usage.UsageError("--configure only applies to --netns")
        from .link.tap import MAX_QUEUES
        if not 1 <= self["queues"] <= MAX_QUEUES:
            raise usage.UsageError(f"--queues takes 1..{MAX_QUEUES}, not {self['queues']}")
        if self["queues"] > 1 and self["tap"] is None and self["netns"] is None:
            raise usage.UsageError("--queues needs a TAP link (--tap or --netns)")
        links = [o for o in ("fd", "tap", "netns", "listen-stream", "connect-stream",
                             "listen-dgram", "vhost-user") if self[o] is not None]
        if len(links) != 1:
            from .link import LINK_OPTIONS
            raise usage.UsageError(f"give exactly one of {LINK_OPTIONS}")
        if self["vnet-hdr"] and self["fd"] is None:
            raise usage.UsageError("--vnet-hdr goes with --fd")
        if self["ready-fd"] is not None:
            try:
                os.fstat(self["ready-fd"])
            except OSError:
                raise usage.UsageError(f"--ready-fd {self['ready-fd']} is not an open fd") from None


def make_service(options):
    """Open the link and build the stack; exit with one line if that fails."""
    from .reactor import install_unless_chosen
    asked = options["busy-poll"]
    busy_poll_us = DEFAULT_BUSY_POLL_US if asked is None else asked
    if install_unless_chosen(busy_poll_us / 1e6) is None and asked:
        # twistd's -r installed another reactor; only an explicit --busy-poll is an error.
        sys.stderr.write("arcbox-net: --busy-poll needs arcbox-net's own reactor; "
                         "drop -r/--reactor\n")
        raise SystemExit(2)
    from twisted.internet import reactor

    from .link import open_link
    from .link.tap import TapError
    from .stack import NetworkStack

    try:
        link = open_link(options.config, fd=options["fd"], tap=options["tap"],
                         netns=options["netns"], tap_name=options["tap-name"],
                         configure=options["configure"],
                         listen_stream=options["listen-stream"],
                         connect_stream=options["connect-stream"],
                         listen_dgram=options["listen-dgram"],
                         vhost_user=options["vhost-user"],
                         offload=not options["no-offload"], queues=options["queues"],
                         vnet_hdr=options["vnet-hdr"])
    except (TapError, ValueError, OSError) as e:
        sys.stderr.write(f"arcbox-net: {e}\n")
        raise SystemExit(1)
    stack = NetworkStack(link, options.config, reactor=reactor)
    from .allocator import tune
    tune()
    if options["pcap"]:
        try:
            stack.start_capture(options["pcap"])
        except OSError as e:
            link.stop()
            sys.stderr.write(f"arcbox-net: cannot write the capture {options['pcap']}: "
                             f"{e.strerror or e}\n")
            raise SystemExit(1)
    # Bind forwards (and the API socket) now, so a port that cannot be bound
    # is a one-line error and a non-zero exit, not a log line later.
    failures = []
    stack.start_forwards().addErrback(failures.append)
    if failures:
        from .stack import _first_error
        link.stop()
        sys.stderr.write(f"arcbox-net: {_first_error(failures[0])}\n")
        raise SystemExit(1)
    if options["api"]:
        from .api import listen_api
        try:
            listen_api(stack, options["api"], reactor)
        except Exception as e:
            link.stop()
            sys.stderr.write(f"arcbox-net: cannot serve the API on {options['api']}: {e}\n")
            raise SystemExit(1)

    def link_lost(_reason):
        if reactor.running:
            reactor.stop()

    stack.whenLinkLost().addCallback(link_lost)
    ready_fd = options["ready-fd"]
    if ready_fd is not None:
        def signal_ready(_):
            try:
                os.write(ready_fd, b"1")
            finally:
                os.close(ready_fd)

        def close_unready(_failure):
            os.close(ready_fd)  # the stack stopped itself and logged why
        # Every queue served (at once with one queue), then ready.
        reactor.callWhenRunning(
            lambda: stack.whenReady().addCallbacks(signal_ready, close_unready))
    return stack

makeService = make_service
