"""slirp4netns 1.2's command line, parsed and mapped onto a StackConfig.

``arcbox-net-slirp4netns [OPTION]... PID|PATH|FD [TAPNAME]`` takes the options
slirp4netns takes (GNU getopt rules, as slirp4netns's getopt_long: ``--opt=value``
and ``--opt value``, clustered short options, options after the operands)
and slirp4netns's address plan: in CIDR (default 10.0.2.0/24) the host and
gateway are .2, DNS .3 and the guest .100; with ``-6`` also fd00::/64 with
the host fd00::2, DNS fd00::3 and DHCPv6 from fd00::100 (without it the guest
has no IPv6 at all, as with slirp4netns). A few arcbox-net options ride
along, on the command line or in ``ARCBOX_NET_SLIRP4NETNS_OPTS`` (rootlesskit
and Podman pass the environment on but not extra arguments): the egress
policy, DNS upstreams and records, a pcap and the HTTP control API.

Every error is one line on stderr and exit status 1, as slirp4netns exits 1.
"""

import getopt
import ipaddress
import os
import shlex
import sys

import attrs

from ..config import ConfigError, StackConfig
from ..wire.ethernet import mac_from_str
from . import PROG
#: Extra arcbox-net options may also come from this environment variable.
ENV_OPTS = "ARCBOX_NET_SLIRP4NETNS_OPTS"
DEFAULT_CIDR = "10.0.2.0/24"
DEFAULT_MTU = 1500
#: Offsets in the CIDR, as slirp4netns: host/gateway, DNS, guest (--configure).
HOST_OFFSET, DNS_OFFSET, GUEST_OFFSET = 2, 3, 100
#: slirp4netns's bounds: the guest at network + 100 must fit.
PREFIX_MIN, PREFIX_MAX = 1, 25
#: slirp4netns's IPv6 plan with -6: the prefix, and host, DNS and first
#: DHCPv6 address in it (the guest itself takes a SLAAC address from the RA).
IPV6_SUBNET = "fd00::/64"
HOST6_OFFSET, DNS6_OFFSET, GUEST6_OFFSET = 2, 3, 0x100

SHORT = "ce:r:m:a:6hv"
LONG = [
    "configure", "exit-fd=", "ready-fd=", "mtu=", "cidr=", "disable-host-loopback",
    "no-host-loopback", "netns-type=", "userns-path=", "api-socket=", "enable-ipv6",
    "enable-sandbox", "create-sandbox", "enable-seccomp", "help", "version",
    "outbound-addr=", "outbound-addr6=", "disable-dns", "macaddress=", "target-type=",
    # arcbox-net's own
    "allow=", "deny=", "dns-upstream=", "dns-record=", "pcap=", "control-api=",
]

HELP = f"""\
Usage: {PROG} [OPTION]... PID|PATH|FD [TAPNAME]
User-mode networking for unprivileged network namespaces: slirp4netns's command
line, served by arcbox-net.

-c, --configure          bring up the interface: the guest address (.100),
                         the default route via the host (.2), the MTU, lo up
-e, --exit-fd=FD         exit when FD is closed or readable
-r, --ready-fd=FD        write "1" to FD (then close it) once serving
-m, --mtu=MTU            MTU (default={DEFAULT_MTU}, 576..65520)
-6, --enable-ipv6        IPv6 on fd00::/64: host fd00::2, DNS fd00::3; the guest
                         autoconfigures from router advertisements (DHCPv6
                         from fd00::100); without -6 there is no IPv6
-a, --api-socket=PATH    slirp4netns's JSON API (add_hostfwd, list_hostfwd,
                         remove_hostfwd) on this unix socket
--cidr=CIDR              network address CIDR (default={DEFAULT_CIDR}): host .2,
                         DNS .3, guest .100
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host through .2
                         (and to [::1]:* through fd00::2 with -6)
--netns-type=TYPE        what PID|PATH|FD names ([path|pid|tapfd], default=pid)
--userns-path=PATH       user namespace to join first (default: /proc/PID/ns/user)
--enable-sandbox         accepted; does nothing here: arcbox-net makes no mount
                         namespace and keeps no capabilities to drop (it runs
                         unprivileged in the caller's namespaces)
--enable-seccomp         accepted; does nothing here: no seccomp filter is loaded
--outbound-addr=IPv4     accepted; not applied: host sockets use the host's
                         default source address (one log line)
--outbound-addr6=IPv6    accepted; not applied: host sockets use the host's
                         default source address (one log line)
--disable-dns            no DNS server on .3
--macaddress=MAC         the MAC address of the TAP (only valid with -c)
--target-type=TYPE       netns only (bess is not supported)
-h, --help               show this help and exit
-v, --version            show version and exit

arcbox-net options (also read from ${ENV_OPTS}):
--allow=CIDR             let the guest reach this CIDR (host address); repeatable
--deny=CIDR              keep the guest from this CIDR (most specific rule wins);
                         repeatable
--dns-upstream=ADDR[:PORT]  DNS upstream (default: the host's /etc/resolv.conf);
                         repeatable
--dns-record=NAME=ADDR   answer NAME with ADDR from the DNS on .3; repeatable
--pcap=PATH              write every frame, both ways, to this pcap file
--control-api=PATH       arcbox-net's HTTP/JSON control API on this unix socket
"""


class UsageError(Exception):
    """A bad command line; the message is the one line printed."""


@attrs.frozen(kw_only=True)
class Options:
    """The parsed command line."""

    action: str = "run"           # run, help or version
    configure: bool = False
    exit_fd: int | None = None
    ready_fd: int | None = None
    mtu: int = DEFAULT_MTU
    enable_ipv6: bool = False
    api_socket: str | None = None
    cidr: str = DEFAULT_CIDR
    disable_host_loopback: bool = False
    netns_type: str = "pid"
    userns_path: str | None = None
    enable_sandbox: bool = False
    enable_seccomp: bool = False
    outbound_addr: str | None = None
    outbound_addr6: str | None = None
    disable_dns: bool = False
    macaddress: str | None = None
    #: What the operand names, by --netns-type.
    target_pid: int | None = None
    netns_path: str | None = None
    tap_fd: int | None = None
    tap_name: str | None = None
    # arcbox-net's own
    allow: tuple = ()
    deny: tuple = ()
    dns_upstreams: tuple = ()
    dns_records: tuple = ()
    pcap: str | None = None
    control_api: str | None = None
    #: Lines to log at start (accepted options that do nothing here).
    notes: tuple = ()


def _fd(name, text):
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{name} must be a non-negative integer, not {text!r}")
    return value


def parse_args(argv, environ=None):
    """Options from ``argv`` (without the program name) and ``environ``'s
    extra options; raises UsageError."""
    environ = os.environ if environ is None else environ
    try:
        extra = shlex.split(environ.get(ENV_OPTS, ""))
    except ValueError as e:
        raise UsageError(f"{ENV_OPTS}: {e}") from None
    try:
        pairs, operands = getopt.gnu_getopt(extra + list(argv), SHORT, LONG)
    except getopt.GetoptError as e:
        raise UsageError(str(e)) from None
    values = {}
    lists = {"allow": [], "deny": [], "dns_upstreams": [], "dns_records": []}
    notes = []
    for opt, arg in pairs:
        if opt in ("-h", "--help"):
            return Options(action="help")
        if opt in ("-v", "--version"):
            return Options(action="version")
        if opt in ("-c", "--configure"):
            values["configure"] = True
        elif opt in ("-e", "--exit-fd"):
            values["exit_fd"] = _fd("exit-fd", arg)
        elif opt in ("-r", "--ready-fd"):
            values["ready_fd"] = _fd("ready-fd", arg)
        elif opt in ("-m", "--mtu"):
            try:
                values["mtu"] = int(arg, 10)
            except ValueError:
                raise UsageError(f"MTU must be a positive integer, not {arg!r}") from None
        elif opt in ("-6", "--enable-ipv6"):
            values["enable_ipv6"] = True
        elif opt in ("-a", "--api-socket"):
            values["api_socket"] = arg
        elif opt == "--cidr":
            values["cidr"] = arg
        elif opt in ("--disable-host-loopback", "--no-host-loopback"):
            values["disable_host_loopback"] = True
        elif opt == "--netns-type":
            if arg not in ("pid", "path", "tapfd"):
                raise UsageError(f"--netns-type must be pid, path or tapfd, not {arg!r}")
            values["netns_type"] = arg
        elif opt == "--userns-path":
            if not os.path.exists(arg):
                raise UsageError(f"userns path doesn't exist: {arg}")
            values["userns_path"] = arg
        elif opt in ("--enable-sandbox", "--create-sandbox"):
            values["enable_sandbox"] = True
            notes.append("--enable-sandbox: accepted, nothing to do (no mount namespace is "
                         "made; arcbox-net holds no capabilities to drop)")
        elif opt == "--enable-seccomp":
            values["enable_seccomp"] = True
            notes.append("--enable-seccomp: accepted, no seccomp filter is loaded")
        elif opt == "--outbound-addr":
            values["outbound_addr"] = arg
            notes.append(f"--outbound-addr {arg}: accepted but not applied: host sockets "
                         "use the host's default source address")
        elif opt == "--outbound-addr6":
            values["outbound_addr6"] = arg
            notes.append(f"--outbound-addr6 {arg}: accepted but not applied: host sockets "
                         "use the host's default source address")
        elif opt == "--disable-dns":
            values["disable_dns"] = True
        elif opt == "--macaddress":
            try:
                mac_from_str(arg)
            except ValueError:
                raise UsageError(f"macaddress {arg!r} is not a MAC address "
                                 "(6 hex bytes separated by ':')") from None
            values["macaddress"] = arg
        elif opt == "--target-type":
            if arg != "netns":
                raise UsageError(f"--target-type {arg!r} is not supported (only netns)")
        elif opt == "--allow":
            lists["allow"].append(arg)
        elif opt == "--deny":
            lists["deny"].append(arg)
        elif opt == "--dns-upstream":
            lists["dns_upstreams"].append(arg)
        elif opt == "--dns-record":
            lists["dns_records"].append(arg)
        elif opt == "--pcap":
            values["pcap"] = arg
        elif opt == "--control-api":
            values["control_api"] = arg
    if values.get("macaddress") and not values.get("configure"):
        raise UsageError("--macaddress cannot be specified when --configure or -c is not "
                         "specified")
    netns_type = values.get("netns_type", "pid")
    if not operands:
        raise UsageError("missing operand: PID|PATH|FD [TAPNAME] (see --help)")
    target = operands[0]
    if netns_type == "pid":
        try:
            pid = int(target, 10)
        except ValueError:
            pid = 0
        if pid <= 0:
            raise UsageError(f"PID must be a positive integer, not {target!r}")
        values["target_pid"] = pid
    elif netns_type == "tapfd":
        values["tap_fd"] = _fd("TAPFD", target)
    else:
        if not os.path.exists(target):
            raise UsageError(f"existing path expected when --netns-type=path: {target}")
        values["netns_path"] = target
    if netns_type == "tapfd":
        tap_name = operands[1] if len(operands) > 1 else None
    else:
        if len(operands) < 2:
            raise UsageError("missing operand: TAPNAME (see --help)")
        tap_name = operands[1]
    if len(operands) > 2:
        notes.append(f"too many arguments: {' '.join(operands[2:])} ignored")
    return Options(notes=tuple(notes), tap_name=tap_name,
                   **{k: tuple(v) for k, v in lists.items()}, **values)


def plan(cidr):
    """(network, host, dns, guest) of slirp4netns's plan in ``cidr``; UsageError."""
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            raise UsageError("CIDR needs to be a network address like 10.0.2.0/24, "
                             f"not like {cidr}") from None
        raise UsageError(f"invalid CIDR: {cidr}") from None
    if not PREFIX_MIN <= net.prefixlen <= PREFIX_MAX:
        raise UsageError(f"prefix length needs to be {PREFIX_MIN}-{PREFIX_MAX}, not "
                         f"{net.prefixlen}")
    base = net.network_address
    return net, base + HOST_OFFSET, base + DNS_OFFSET, base + GUEST_OFFSET


def plan6():
    """(network, host, dns, first DHCPv6 address) of slirp4netns's -6 plan."""
    net = ipaddress.IPv6Network(IPV6_SUBNET)
    base = net.network_address
    return net, base + HOST6_OFFSET, base + DNS6_OFFSET, base + GUEST6_OFFSET


def stack_config(options):
    """The StackConfig for ``options``: slirp4netns's address plan (IPv6 only
    with -6, as slirp4netns), host loopback on .2 (and fd00::2) unless
    disabled, and arcbox-net's policy options.

    The network itself is never a destination on the host: every address in
    it is one of the stack's (slirp4netns's "aliases"), so it is denied
    rather than sent to a same-numbered network the host may route to.
    """
    net, host, dns, guest = plan(options.cidr)
    v6 = {}
    if options.enable_ipv6:
        net6, host6, dns6, guest6 = plan6()
        v6 = dict(ipv6_subnet=net6, ipv6_gateway=host6, ipv6_dns=dns6, ipv6_guest=guest6)
    try:
        return StackConfig(
            subnet=net, gateway=host, dns=dns, guest=guest, mtu=options.mtu,
            ipv6=options.enable_ipv6, **v6,
            host_loopback=not options.disable_host_loopback,
            allow=options.allow, deny=("169.254.0.0/16", str(net), *options.deny),
            dns_upstreams=options.dns_upstreams, dns_records=options.dns_records)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def version_text():
    from importlib import metadata
    try:
        ours = metadata.version("arcbox-net")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return (f"{PROG} version {ours} (arcbox-net {ours}; slirp4netns 1.2 command line)\n"
            f"arcbox-net: {ours}\n")


def main(argv=None):
    """The console script: parse, then serve until the exit fd, a signal or
    the link ends it."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse_args(argv)
        if options.action == "help":
            sys.stdout.write(HELP)
            return 0
        if options.action == "version":
            sys.stdout.write(version_text())
            return 0
        config = stack_config(options)
        for name in ("exit_fd", "ready_fd", "tap_fd"):
            fd = getattr(options, name)
            if fd is not None:
                try:
                    os.fstat(fd)
                except OSError:
                    raise UsageError(f"{name.replace('_', '-')} {fd} is not an open fd") from None
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1
    from .runner import run
    return run(options, config)
