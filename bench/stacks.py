"""The stacks under test, each giving a fresh guest namespace a network.

A stack object is started for one MTU and stopped afterwards. What the
workloads need from it:

  guest_ns      namespace the guest-side programs run in
  host_ns       namespace the host-side servers run in (None: this host)
  server_addr   address the host-side servers bind
  gateway       address the guest uses to reach ``server_addr``
  pid           the stack's process (CPU, RSS, fds), None for the kernel
  relay_pid     the VMM stand-in frames cross on the way (QEMU, vnet_relay.py),
                whose CPU is counted apart; None without one
  forward()     (namespace, address, port) a host client uses to reach the
                guest's port 5201, or Unsupported
  dns           (server, name) for the DNS workload, or None and ``dns_reason``
  gateway6      address the guest uses to reach ``server_addr6`` over IPv6 (the
                host's ::1), after ``ipv6_ready()``; None: no IPv6 row, for
                ``ipv6_reason``

Everything stays on this machine: servers bind loopback (or the host end of
the kernel veth, itself in a namespace of its own), arcbox-net runs with
``--deny 0.0.0.0/0 --allow 127.0.0.0/8 --deny ::/0 --allow ::1/128`` and DNS
upstreams on loopback only. This machine's IPv6 is a real network (its eth0 has
a v6 default route), so the IPv6 rows of pasta, which copies the host's
addresses and routes, run in a host namespace of their own whose only route
leads into a veth with nothing behind it.
"""

import contextlib
import itertools
import json
import os
import select
import shutil
import socket
import subprocess
import time

from .common import (PYTHON, REPO, Unsupported, free_port, last_line, netns_add, netns_attach,
                     netns_del, spawn, stop, wait_ready_fd)

GUEST_PORT = 5201          # the guest's iperf3 server for the port-forward workload
VNET_RELAY = os.path.join(REPO, "tests", "programs", "vnet_relay.py")
_ids = itertools.count()


def _ns_name(kind):
    return f"abxb-{os.getpid()}-{kind}-{next(_ids)}"


class Stack:
    name = "?"
    host_ns = None
    server_addr = "127.0.0.1"
    pid = None
    relay_pid = None
    dns = None
    dns_reason = "this stack offers no resolver with a local name"
    #: Workload ids this stack runs (None: all); a variant that differs from its
    #: base stack in one respect runs only the workloads that respect can change.
    only_workloads = None
    #: IPv6 rows: where the guest reaches the host's ::1 (None: none, see ipv6_reason).
    gateway6 = None
    server_addr6 = "::1"
    ipv6_reason = "no IPv6 row for this stack"

    def __init__(self, mtu, logdir, twistd):
        self.mtu = mtu
        self.logdir = logdir
        self.twistd = twistd
        self.guest_ns = None
        self.proc = None
        self.log_path = None
        self.forward_port = free_port()

    def _log(self):
        self.log_path = os.path.join(self.logdir, f"{self.name}-{self.mtu}-{next(_ids)}.log")
        return open(self.log_path, "w")

    def log_tail(self):
        try:
            with open(self.log_path) as f:
                return last_line(f.read())
        except (OSError, TypeError):
            return ""

    def start(self):
        raise NotImplementedError

    def forward(self):
        raise Unsupported("no port forwarding")

    def ipv6_ready(self):
        """Make sure the guest can reach ``server_addr6`` at ``gateway6``, or raise
        Unsupported. Called before each IPv6 workload."""
        raise Unsupported(self.ipv6_reason)

    @contextlib.contextmanager
    def competitor(self):
        """What runs beside the stack during each workload (the +hog variants)."""
        yield

    def stop(self):
        stop(self.proc)
        self.proc = None
        if self.guest_ns:
            netns_del(self.guest_ns)
            self.guest_ns = None

    @staticmethod
    def version():
        return None


def _wait_ipv6(ns, ifname="tap0", timeout=15):
    """Wait until ``ifname`` in ``ns`` has a global IPv6 address out of DAD and a
    default route (from a router advertisement); raise Unsupported if not."""
    deadline = time.monotonic() + timeout
    while True:
        addrs = subprocess.run(["ip", "-n", ns, "-6", "addr", "show", "dev", ifname,
                                "scope", "global"], capture_output=True, text=True).stdout
        route = subprocess.run(["ip", "-n", ns, "-6", "route", "show", "default"],
                               capture_output=True, text=True).stdout
        if "inet6" in addrs and "tentative" not in addrs and "default" in route:
            return
        if time.monotonic() > deadline:
            raise Unsupported(f"the guest got no IPv6 address and default route in {timeout} s")
        time.sleep(0.1)


class ArcboxNet(Stack):
    name = "arcbox-net"
    gateway = "10.0.2.1"
    gateway6 = "fd00::1"           # the gateway, which reaches the host's ::1
    _help = None
    extra_args = []

    def options(self):
        """The stack's --help text, to use only the options this version has."""
        if ArcboxNet._help is None:
            result = subprocess.run([self.twistd, "arcbox-net", "--help"], capture_output=True,
                                    text=True, timeout=60)
            ArcboxNet._help = result.stdout + result.stderr
        return ArcboxNet._help

    def start(self):
        self.guest_ns = netns_add(_ns_name("arcbox"))
        self._start_twistd(["--netns", self.guest_ns, "--configure"])

    def _start_twistd(self, link_args, pass_fds=()):
        """twistd arcbox-net on ``link_args``, with the options this version has."""
        help_text = self.options()
        args = [*link_args, "--mtu", str(self.mtu), "--deny", "0.0.0.0/0",
                "--allow", "127.0.0.0/8"]
        self.has_forward = "--forward" in help_text
        self.has_ipv6 = "--no-ipv6" in help_text
        if self.has_ipv6:
            args += ["--deny", "::/0", "--allow", "::1/128"]
        if self.has_forward:
            args += ["--forward", f"tcp:127.0.0.1:{self.forward_port}:{GUEST_PORT}"]
        if "--dns-upstream" in help_text:
            # Names it does not know locally go to a closed loopback port: never off the machine.
            args += ["--dns-upstream", f"127.0.0.1:{free_port()}"]
        if "--max-connections" in help_text:
            args += ["--max-connections", "16384"]
        args += self.extra_args
        read_fd, write_fd = os.pipe()
        cmd = [self.twistd, "-n", "--pidfile=", "arcbox-net", *args, "--ready-fd", str(write_fd)]
        with self._log() as log:
            self.proc = spawn(cmd, log=log, pass_fds=(write_fd, *pass_fds))
        os.close(write_fd)
        if not wait_ready_fd(read_fd, self.proc, timeout=30):
            raise RuntimeError(f"arcbox-net did not become ready: {self.log_tail()}")
        self.pid = self.proc.pid
        self.dns = ("10.0.2.1", "host.arcbox.internal")

    def forward(self):
        if not self.has_forward:
            raise Unsupported("this arcbox-net has no --forward option")
        return None, "127.0.0.1", self.forward_port

    def ipv6_ready(self):
        """The guest's tap0 gets fd00::2 (the stack's first DHCPv6 address; no DAD
        wait) and a default route via the router's fe80::1, as from its RA."""
        if not self.has_ipv6:
            raise Unsupported("this arcbox-net has no IPv6")
        if getattr(self, "_ipv6_done", False):
            return
        ns = self.guest_ns
        subprocess.run(["ip", "-n", ns, "addr", "replace", "fd00::2/64", "dev", "tap0", "nodad"],
                       check=True, capture_output=True)
        subprocess.run(["ip", "-n", ns, "-6", "route", "replace", "default", "via", "fe80::1",
                        "dev", "tap0"], check=True, capture_output=True)
        self._ipv6_done = True

    @staticmethod
    def version():
        import arcbox_net
        return getattr(arcbox_net, "__version__", None)


class ArcboxNetNoOffload(ArcboxNet):
    """The same TAP without virtio-net offloads: frames of at most the MTU, as on
    the socket links (--fd, QEMU stream/dgram), which carry no offload metadata."""

    name = "arcbox-net-nooffload"
    extra_args = ["--no-offload"]


def _qemu_version(qemu):
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except OSError:
        return None
    return out.split("\n", 1)[0].replace("QEMU emulator version ", "qemu ")


def _ip(ns, *args):
    subprocess.run(["ip", *(["-n", ns] if ns else []), *args], check=True, capture_output=True)


class QemuRelay:
    """QEMU with no guest (``-machine none``) joining a TAP and a second netdev
    through its hub: the copy every frame of a VM's NIC takes through QEMU."""

    qemu = "qemu-system-x86_64"
    qemu_proc = None

    def _start_qemu(self, netdev, ns, ifname, pass_fds=()):
        """QEMU in ``ns`` (None: this host) with TAP ``ifname`` and ``netdev`` (id s0)."""
        if shutil.which(self.qemu) is None:
            raise Unsupported(f"{self.qemu} is not installed")
        with self._log() as log:
            self.qemu_proc = spawn([self.qemu, "-machine", "none", "-nodefaults", "-display",
                                    "none", "-netdev", f"tap,id=t0,ifname={ifname},script=no,"
                                    "downscript=no,vnet_hdr=off", "-netdev", netdev,
                                    "-netdev", "hubport,id=h0,hubid=0,netdev=t0",
                                    "-netdev", "hubport,id=h1,hubid=0,netdev=s0"],
                                   ns=ns, log=log, pass_fds=pass_fds)
        self.relay_pid = self.qemu_proc.pid
        deadline = time.monotonic() + 15
        while subprocess.run(["ip", *(["-n", ns] if ns else []), "link", "show", ifname],
                             capture_output=True).returncode != 0:
            if self.qemu_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU made no {ifname}: {self.log_tail()}")
            time.sleep(0.05)

    def _stop_qemu(self):
        stop(self.qemu_proc)
        self.qemu_proc = None

    @classmethod
    def version(cls):
        return _qemu_version(cls.qemu)


class ArcboxNetQemuStream(QemuRelay, ArcboxNet):
    """The socket-link path a VM uses: arcbox-net on ``--listen-stream`` and QEMU
    (no guest booted, ``-machine none``) relaying the namespace's tap0 to its
    ``-netdev stream`` through a hub, so every frame also crosses QEMU. Plain
    frames of at most the MTU, no offload metadata, as with --fd and dgram."""

    name = "arcbox-net-qemu"

    #: QEMU 7.2 aborts ("iov_copy: Assertion `offset == 0' failed") relaying
    #: frames this large from its tap to -netdev stream under load (seen at
    #: MTU 48000, 61000 and 65520; 32000 and below ran clean).
    max_mtu = 32000
    too_large = ("QEMU's -netdev stream aborts relaying frames over {max_mtu} bytes "
                 "(iov_copy assertion, QEMU 7.2)")
    #: sysctls set in the guest namespace (where QEMU runs) before QEMU starts.
    qemu_sysctls = ()

    def link_and_netdev(self):
        """(arcbox-net's link options, QEMU's -netdev for the other end, fds QEMU needs)."""
        path = self._socket_path("stream")
        return (["--listen-stream", path],
                f"stream,id=s0,server=off,addr.type=unix,addr.path={path}", ())

    def _socket_path(self, tag):
        return os.path.join(self.logdir, f"{tag}-{os.getpid()}-{next(_ids)}.sock")

    def start(self):
        if shutil.which(self.qemu) is None:
            raise Unsupported(f"{self.qemu} is not installed")
        if self.max_mtu is not None and self.mtu > self.max_mtu:
            raise Unsupported(self.too_large.format(max_mtu=self.max_mtu))
        self.guest_ns = netns_add(_ns_name("abxq"))
        for setting in self.qemu_sysctls:
            subprocess.run(["ip", "netns", "exec", self.guest_ns, "sysctl", "-qw", setting],
                           check=True, capture_output=True)
        link_args, netdev, qemu_fds = self.link_and_netdev()
        self._start_twistd(link_args)
        self._start_qemu(netdev, self.guest_ns, "tap0", pass_fds=qemu_fds)
        self.link_started()
        for ip_args in (["link", "set", "tap0", "mtu", str(self.mtu), "up"],
                        ["addr", "add", "10.0.2.2/24", "dev", "tap0"],
                        ["route", "add", "default", "via", self.gateway]):
            _ip(self.guest_ns, *ip_args)

    def link_started(self):
        """Both ends run: close what the parent still holds for them."""

    def stop(self):
        self._stop_qemu()
        super().stop()


class ArcboxNetQemuDgram(ArcboxNetQemuStream):
    """The same relay to ``-netdev dgram`` and arcbox-net's ``--listen-dgram``: one
    frame per datagram, so QEMU has no partial writes and the largest MTU works.
    Bulk workloads only (the stream stack has the rest)."""

    name = "arcbox-net-qemu-dgram"
    max_mtu = None
    only_workloads = ("tcp_up_1", "tcp_down_1", "port_forward")

    def link_and_netdev(self):
        ours, theirs = self._socket_path("dgram"), self._socket_path("qemu")
        return (["--listen-dgram", ours],
                f"dgram,id=s0,local.type=unix,local.path={theirs},"
                f"remote.type=unix,remote.path={ours}", ())


class ArcboxNetQemuDgramQlen(ArcboxNetQemuDgram):
    """The dgram relay with QEMU's socket made at ``net.unix.max_dgram_qlen`` 512.
    QEMU's -netdev dgram socket is not connected to ours (it uses sendto), so the
    kernel holds our sends to it to its receive queue's qlen (default 10) and each
    full queue waits for QEMU to be scheduled. The limit is per network namespace,
    read when a socket is made: what raising it (as a user could) buys."""

    name = "arcbox-net-qemu-dgram-qlen512"
    qemu_sysctls = ("net.unix.max_dgram_qlen=512",)


class ArcboxNetQemuFd(ArcboxNetQemuStream):
    """The same relay with a socketpair between them: one end ``--fd N`` for
    arcbox-net, the other QEMU's ``-netdev dgram,local.type=fd`` (a VMM that
    hands the stack a socket it made). One frame per datagram, no MTU limit.
    Bulk workloads only."""

    name = "arcbox-net-qemu-fd"
    max_mtu = None
    only_workloads = ("tcp_up_1", "tcp_down_1", "port_forward")
    _pair = ()

    def link_and_netdev(self):
        self._pair = ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return (["--fd", str(ours.fileno())], f"dgram,id=s0,local.type=fd,local.str="
                f"{theirs.fileno()}", (theirs.fileno(),))

    def _start_twistd(self, link_args, pass_fds=()):
        super()._start_twistd(link_args, pass_fds=(*pass_fds, self._pair[0].fileno()))

    def link_started(self):
        for end in self._pair:
            end.close()
        self._pair = ()

    def stop(self):
        self.link_started()
        super().stop()


class ArcboxNetFdVnet(ArcboxNet):
    """``--fd N --vnet-hdr``: the namespace's tap0 opened with IFF_VNET_HDR and
    offloads by tests/programs/vnet_relay.py, which passes each frame with its
    12-byte virtio_net_hdr_v1 over a socketpair, as a VMM speaking virtio-net
    would: TSO frames up to 64 KiB and partial checksums cross it both ways.
    The relay (two Python threads) counts as relay CPU, as QEMU does."""

    name = "arcbox-net-fd-vnet"
    relay_proc = None

    def start(self):
        self.guest_ns = netns_add(_ns_name("abxv"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with self._log() as log:
                self.relay_proc = spawn([PYTHON, VNET_RELAY, "tap0", str(theirs.fileno())],
                                        ns=self.guest_ns, pass_fds=(theirs.fileno(),),
                                        stdout=subprocess.PIPE, stderr=log, text=True)
            ready, _, _ = select.select([self.relay_proc.stdout], [], [], 15)
            if not ready or self.relay_proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"vnet_relay.py did not start: {self.log_tail()}")
            self.relay_pid = self.relay_proc.pid
            # Up before the stack's first frame (its router advertisement): the relay
            # ends on a write to a TAP that is down (EIO).
            _ip(self.guest_ns, "link", "set", "tap0", "mtu", str(self.mtu), "up")
            self._start_twistd(["--fd", str(ours.fileno()), "--vnet-hdr"],
                               pass_fds=(ours.fileno(),))
        finally:
            ours.close()
            theirs.close()
        for ip_args in (["addr", "add", "10.0.2.2/24", "dev", "tap0"],
                        ["route", "add", "default", "via", self.gateway]):
            _ip(self.guest_ns, *ip_args)

    def stop(self):
        stop(self.relay_proc)
        self.relay_proc = None
        super().stop()


class LibslirpQemu(QemuRelay, Stack):
    """libslirp, through the same QEMU relay: the namespace's tap0, QEMU's hub,
    and QEMU's own ``-netdev user`` at the other end. QEMU runs in this host's
    namespace, so libslirp's host sockets see its loopback (10.0.2.2 is that
    loopback to the guest): the TAP is made here, then moved into the guest's
    namespace (QEMU's fd keeps working).

    libslirp has no egress policy, so the guest gets no default route: only
    10.0.2.2, the host's loopback, is routed (not even libslirp's DNS at
    10.0.2.3, which forwards to the host's resolver), and IPv6 is off."""

    name = "libslirp-qemu"
    gateway = "10.0.2.2"
    ipv6_reason = "libslirp behind the QEMU relay runs with ipv6=off (no egress policy)"
    guest_addr = "10.0.2.15"       # libslirp's first DHCP address, hostfwd's default target
    dns_reason = ("libslirp's DNS (10.0.2.3) only forwards to the host's resolver: no local "
                  "name, and the benchmark sends nothing off this machine")

    def start(self):
        self.guest_ns = netns_add(_ns_name("lslirp"))
        ifname = f"abxl{os.getpid() % 100000}-{next(_ids)}"[:15]
        self._start_qemu(f"user,id=s0,net=10.0.2.0/24,host={self.gateway},ipv6=off,"
                         f"hostfwd=tcp:127.0.0.1:{self.forward_port}-:{GUEST_PORT}",
                         None, ifname)
        self.pid = self.qemu_proc.pid
        try:
            _ip(None, "link", "set", ifname, "netns", self.guest_ns)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"could not move {ifname} into {self.guest_ns}: "
                               f"{e.stderr.decode().strip()}")
        for ip_args in (["link", "set", ifname, "name", "tap0"],
                        ["link", "set", "tap0", "mtu", str(self.mtu), "up"],
                        ["addr", "add", f"{self.guest_addr}/32", "dev", "tap0"],
                        ["route", "add", f"{self.gateway}/32", "dev", "tap0"]):
            _ip(self.guest_ns, *ip_args)

    def forward(self):
        return None, "127.0.0.1", self.forward_port

    def stop(self):
        self._stop_qemu()
        super().stop()


def with_competitor(base):
    """``base`` with a CPU competitor during each workload: one busy loop per CPU
    but one, unpinned, as a VM's busy vCPU threads beside the stack (on this
    2-core machine: one vCPU flat out, placed by the scheduler as QEMU leaves
    it). Only the one-stream bulk workloads, where a starved link shows."""

    class WithCompetitor(base):
        name = f"{base.name}+hog"
        only_workloads = ("tcp_up_1", "tcp_down_1")
        hogs = max(1, (os.cpu_count() or 2) - 1)

        @contextlib.contextmanager
        def competitor(self):
            procs = [spawn([PYTHON, "-c", "while True: pass"]) for _ in range(self.hogs)]
            try:
                time.sleep(0.2)             # let the scheduler place them first
                yield
            finally:
                for proc in procs:
                    stop(proc)

    WithCompetitor.__name__ = WithCompetitor.__qualname__ = f"{base.__name__}WithCompetitor"
    return WithCompetitor


class ArcboxNetNoBusyPoll(ArcboxNet):
    """Without adaptive polling (--busy-poll 0): what the polling buys on the
    latency workloads (it cannot change the others, which never wait)."""

    name = "arcbox-net-nopoll"
    extra_args = ["--busy-poll", "0"]
    only_workloads = ("tcp_rr", "conn_rate")


class ArcboxNetQueues(ArcboxNet):
    """The TAP opened multi-queue, two processes (--queues 2): what a second
    CPU buys when several connections are busy. CPU, memory and fds count
    both processes."""

    name = "arcbox-net-2q"
    extra_args = ["--queues", "2"]


class Slirp4netns(Stack):
    """slirp4netns --configure, with --enable-ipv6 (the guest takes fd00::/64 from
    its router advertisement; fd00::2 is its alias of the host's ::1)."""

    name = "slirp4netns"
    gateway = "10.0.2.2"           # slirp4netns's alias of the host's loopback
    gateway6 = "fd00::2"
    dns_reason = ("slirp4netns's DNS (10.0.2.3) only forwards to the host's resolver: "
                  "it has no local name, and the benchmark sends nothing off this machine")

    def start(self):
        self.guest_ns = netns_add(_ns_name("slirp"))
        self.api_socket = os.path.join(self.logdir, f"slirp-{os.getpid()}-{next(_ids)}.sock")
        read_fd, write_fd = os.pipe()
        cmd = ["slirp4netns", "--configure", f"--mtu={self.mtu}", "--enable-ipv6",
               "--netns-type=path",
               "--api-socket", self.api_socket, "--ready-fd", str(write_fd),
               f"/var/run/netns/{self.guest_ns}", "tap0"]
        with self._log() as log:
            self.proc = spawn(cmd, log=log, pass_fds=(write_fd,))
        os.close(write_fd)
        if not wait_ready_fd(read_fd, self.proc, timeout=15):
            raise RuntimeError(f"slirp4netns did not become ready: {self.log_tail()}")
        self.pid = self.proc.pid

    def forward(self):
        request = {"execute": "add_hostfwd",
                   "arguments": {"proto": "tcp", "host_addr": "127.0.0.1",
                                 "host_port": self.forward_port, "guest_port": GUEST_PORT}}
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.api_socket)
            s.sendall(json.dumps(request).encode())
            reply = json.loads(s.recv(4096))
        if "error" in reply:
            raise RuntimeError(f"slirp4netns add_hostfwd: {reply['error']}")
        return None, "127.0.0.1", self.forward_port

    def ipv6_ready(self):
        _wait_ipv6(self.guest_ns)

    def stop(self):
        super().stop()
        if getattr(self, "api_socket", None) and os.path.exists(self.api_socket):
            os.unlink(self.api_socket)

    @staticmethod
    def version():
        out = subprocess.run(["slirp4netns", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].split()[-1] if out else None


class Rootlesskit(Stack):
    """Debian's rootlesskit, run rootless as Docker's rootless mode runs it, with
    ``--net=slirp4netns`` and a ``sleep`` as its child: the child's network
    namespace (named with ``ip netns attach``) is the guest. rootlesskit and its
    network binary run as an unprivileged user (bench/rootless.py) inside a fresh
    "host" namespace that has only lo, where the servers bind 127.0.0.1: whatever
    the binary does, nothing leaves it. rootlesskit 1.1 allows the host's
    loopback unless ``--disable-host-loopback``, so 10.0.2.2 is that loopback.
    The stack's figures are the network binary's process (and its children).
    arcbox-net-slirp4netns keeps arcbox-net's default of 4096 connections (its
    environment options have no --max-connections), so scale_5000 stops there."""

    gateway = "10.0.2.2"
    ipv6_reason = "run as Docker's rootless mode runs it: rootlesskit without --ipv6"
    binary = None               # the --slirp4netns-binary, from the user's venv or $PATH
    dns_reason = ("via rootlesskit, DNS (10.0.2.3) forwards to the resolver of a host "
                  "namespace that has only lo: no local name here")
    _user = None
    _session = None

    def binary_path(self, user):
        raise NotImplementedError

    def start(self):
        from . import rootless
        if shutil.which("rootlesskit") is None:
            raise Unsupported("rootlesskit is not installed (Debian rootlesskit, uidmap)")
        self._user = user = rootless.user()
        user.open_tun()
        self.host_ns = netns_add(_ns_name("rkhost"))
        state = user.state_dir(self.name)
        binary = self.binary_path(user)
        cmd = ["runuser", "-u", rootless.USER, "--", "env",
               "ARCBOX_NET_SLIRP4NETNS_OPTS=--deny 0.0.0.0/0 --allow 127.0.0.0/8",
               "rootlesskit", "--debug", f"--state-dir={state}/rk", "--net=slirp4netns",
               f"--slirp4netns-binary={binary}", f"--mtu={self.mtu}",
               "--port-driver=slirp4netns", "-p", f"127.0.0.1:{self.forward_port}:{GUEST_PORT}/tcp",
               "sleep", "infinity"]
        with self._log() as log:
            self.proc = spawn(cmd, ns=self.host_ns, log=log, start_new_session=True, cwd="/")
        self._session = self.proc.pid
        child_pid = os.path.join(state, "rk", "child_pid")
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rootlesskit exited ({self.proc.returncode}): "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rootlesskit did not start its child: {self.log_tail()}")
            if self.guest_ns is None and os.path.exists(child_pid):
                with open(child_pid) as f:
                    pid = f.read().strip()
                if pid:
                    self.guest_ns = netns_attach(_ns_name("rkguest"), pid)
            if self.guest_ns is not None:
                addr = subprocess.run(["ip", "-n", self.guest_ns, "-4", "addr", "show", "tap0"],
                                      capture_output=True, text=True).stdout
                if "10.0.2.100/" in addr and (self.pid or self._find_binary(binary)):
                    return
            time.sleep(0.1)

    def _find_binary(self, binary):
        """The network binary's pid: the user's process running it (rootlesskit is
        multithreaded, so its children are not all listed under its main thread)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                if os.stat(f"/proc/{pid}").st_uid != self._user.uid:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if binary in argv[:2]:
                self.pid = pid
                return pid
        return None

    def forward(self):
        return self.host_ns, "127.0.0.1", self.forward_port

    def stop(self):
        if self._session is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._session, 15)
            self._session = None
        super().stop()
        if self._user is not None:
            self._user.end_processes()
        if self.host_ns:
            netns_del(self.host_ns)
            self.host_ns = None

    @staticmethod
    def version():
        out = subprocess.run(["rootlesskit", "--version"], capture_output=True, text=True).stdout
        return out.split()[-1] if out else None


class ArcboxNetRootlesskit(Rootlesskit):
    """arcbox-net-slirp4netns as rootlesskit's --slirp4netns-binary, with
    ``--deny 0.0.0.0/0 --allow 127.0.0.0/8`` through ARCBOX_NET_SLIRP4NETNS_OPTS."""

    name = "arcbox-net-rootlesskit"

    def binary_path(self, user):
        return user.script


class Slirp4netnsRootlesskit(Rootlesskit):
    """Debian's slirp4netns as rootlesskit's --slirp4netns-binary."""

    name = "slirp4netns-rootlesskit"

    def binary_path(self, user):
        path = shutil.which("slirp4netns")
        if path is None:
            raise Unsupported("slirp4netns is not installed")
        return path


class Pasta(Stack):
    name = "pasta"
    gateway = "10.0.2.2"           # pasta maps its gateway address to the host's loopback
    ipv6_reason = ("pasta copies the host's IPv6 addresses and routes, and this host's are "
                   "a real network: see pasta-v6 (a sandboxed host namespace)")
    dns_reason = ("pasta only forwards DNS to the host's resolver (--dns-forward): no local "
                  "name, and the benchmark sends nothing off this machine")

    def start(self):
        if shutil.which("pasta") is None:
            raise Unsupported("pasta is not installed (Debian package passt)")
        self.guest_ns = netns_add(_ns_name("pasta"))
        # --runas 0: as root, pasta would otherwise switch to nobody and then fail with
        # "Couldn't switch to pasta namespaces". -q: this version's debug logging crashes.
        cmd = ["pasta", "--netns", self.guest_ns, "--runas", "0", "--config-net", "-4",
               "-I", "tap0", "-a", "10.0.2.15", "-n", "24", "-g", self.gateway,
               "-m", str(self.mtu), "-t", f"127.0.0.1/{self.forward_port}:{GUEST_PORT}",
               "-u", "none", "-T", "none", "-U", "none", "-f", "-q"]
        with self._log() as log:
            self.proc = spawn(cmd, log=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unsupported(f"pasta exited ({self.proc.returncode}): {self.log_tail()}")
            addr = subprocess.run(["ip", "-n", self.guest_ns, "-4", "addr", "show", "tap0"],
                                  capture_output=True, text=True).stdout
            if "10.0.2.15" in addr:
                self.pid = self.proc.pid
                return
            time.sleep(0.1)
        raise Unsupported(f"pasta did not configure the namespace: {self.log_tail()}")

    def forward(self):
        return None, "127.0.0.1", self.forward_port

    @staticmethod
    def version():
        if shutil.which("dpkg-query") is None:
            return None
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "passt"],
                             capture_output=True, text=True).stdout
        return out or None


class Pasta6(Pasta):
    """pasta for the IPv6 rows, in a host namespace of its own: lo (the servers
    on ::1 there) and a veth into a namespace with nothing in it, holding the
    addresses pasta copies (fd10::1/64, 10.250.0.1/24) and default routes, so
    whatever pasta sends anywhere but the host's loopback goes nowhere. The
    guest gets fd10::1 and reaches that ::1 at the gateway, fd10::ff, which
    pasta maps to the host's loopback."""

    name = "pasta-v6"
    gateway6 = "fd10::ff"
    only_workloads = ("tcp6_up_1", "tcp6_down_1")
    sink_ns = None

    def start(self):
        if shutil.which("pasta") is None:
            raise Unsupported("pasta is not installed (Debian package passt)")
        self.host_ns = netns_add(_ns_name("pastahost"))
        self.sink_ns = netns_add(_ns_name("pastasink"))
        self.guest_ns = netns_add(_ns_name("pasta6"))
        host = self.host_ns
        for cmd in (["link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns",
                     self.sink_ns],
                    ["link", "set", "lo", "up"], ["link", "set", "v0", "up"],
                    ["addr", "add", "fd10::1/64", "dev", "v0", "nodad"],
                    ["-6", "route", "add", "default", "via", "fd10::ff", "dev", "v0"],
                    ["addr", "add", "10.250.0.1/24", "dev", "v0"],
                    ["route", "add", "default", "via", "10.250.0.254", "dev", "v0"]):
            _ip(host, *cmd)
        _ip(self.sink_ns, "link", "set", "v1", "up")
        cmd = ["pasta", "--netns", f"/var/run/netns/{self.guest_ns}", "--runas", "0",
               "--config-net", "-I", "tap0", "-m", str(self.mtu), "-t", "none", "-u", "none",
               "-T", "none", "-U", "none", "-f", "-q"]
        with self._log() as log:
            self.proc = spawn(cmd, ns=host, log=log)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unsupported(f"pasta exited ({self.proc.returncode}): {self.log_tail()}")
            addr = subprocess.run(["ip", "-n", self.guest_ns, "-4", "addr", "show", "tap0"],
                                  capture_output=True, text=True).stdout
            if "10.250.0.1" in addr:
                self.server_addr = "127.0.0.1"
                self.gateway = "10.250.0.254"
                return
            time.sleep(0.1)
        raise Unsupported(f"pasta did not configure the namespace: {self.log_tail()}")

    def ipv6_ready(self):
        _wait_ipv6(self.guest_ns)

    def forward(self):
        raise Unsupported("IPv6 rows only")

    def stop(self):
        super().stop()
        for attr in ("host_ns", "sink_ns"):
            if getattr(self, attr):
                netns_del(getattr(self, attr))
                setattr(self, attr, None)


class Kernel(Stack):
    """A veth pair between the guest and a host-side namespace: the physical limit."""

    name = "kernel"
    host_addr = "10.200.0.1"
    guest_addr = "10.200.0.2"
    server_addr = host_addr
    gateway = host_addr
    host_addr6, guest_addr6 = "fd10::1", "fd10::2"
    server_addr6 = gateway6 = host_addr6
    dns_reason = "no resolver on the kernel path"

    def start(self):
        self.guest_ns = netns_add(_ns_name("kguest"))
        self.host_ns = netns_add(_ns_name("khost"))
        steps = [
            ["ip", "-n", self.host_ns, "link", "add", "vh", "type", "veth",
             "peer", "name", "vg", "netns", self.guest_ns],
            ["ip", "-n", self.host_ns, "addr", "add", f"{self.host_addr}/30", "dev", "vh"],
            ["ip", "-n", self.guest_ns, "addr", "add", f"{self.guest_addr}/30", "dev", "vg"],
            ["ip", "-n", self.host_ns, "link", "set", "vh", "mtu", str(self.mtu), "up"],
            ["ip", "-n", self.guest_ns, "link", "set", "vg", "mtu", str(self.mtu), "up"],
            ["ip", "-n", self.guest_ns, "route", "add", "default", "via", self.host_addr],
            ["ip", "-n", self.host_ns, "addr", "add", f"{self.host_addr6}/64", "dev", "vh",
             "nodad"],
            ["ip", "-n", self.guest_ns, "addr", "add", f"{self.guest_addr6}/64", "dev", "vg",
             "nodad"],
        ]
        for cmd in steps:
            subprocess.run(cmd, check=True, capture_output=True)

    def forward(self):
        return self.host_ns, self.guest_addr, GUEST_PORT

    def ipv6_ready(self):
        pass

    def stop(self):
        super().stop()
        if self.host_ns:
            netns_del(self.host_ns)
            self.host_ns = None

    @staticmethod
    def version():
        return os.uname().release


#: The VM-link stacks that also run with a CPU competitor.
_CONTENDED = (ArcboxNetQemuStream, ArcboxNetQemuDgram, ArcboxNetQemuDgramQlen, ArcboxNetQemuFd,
              LibslirpQemu)

STACKS = {cls.name: cls for cls in (ArcboxNet, ArcboxNetQueues, ArcboxNetNoOffload,
                                       ArcboxNetQemuStream, ArcboxNetQemuDgram,
                                       ArcboxNetQemuDgramQlen, ArcboxNetQemuFd,
                                       ArcboxNetFdVnet, LibslirpQemu,
                                       *map(with_competitor, _CONTENDED),
                                       ArcboxNetNoBusyPoll, Slirp4netns,
                                       ArcboxNetRootlesskit, Slirp4netnsRootlesskit,
                                       Pasta, Pasta6, Kernel)}
