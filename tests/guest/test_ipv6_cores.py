"""The IPv6 cores (issue 16) against a real Linux kernel, before the stack wires
them in: a guest namespace with ``accept_ra=2`` on a TAP, and a frame loop in
this test standing in for the dispatcher (parse with ``wire.ipv6``, NDP to
``NdpResponder``, the RA schedule from ``RouterAdvertiser.poll``, echo to the
gateway answered with ``icmpv6.echo_reply``). What is asserted is the kernel's
own view: the SLAAC address, the default route via fe80::1, the MTU from the
RA, the gateway's neighbour entry, and ping replies.

Only the guest namespace and the TAP are used: no packet leaves this machine.
Once the dispatcher serves IPv6 this test's loop is replaced by the stack
itself (StackProcess) and these assertions move to that test."""

import fcntl
import ipaddress
import os
import select
import struct
import threading
import time

from conftest import in_ns, run

from arcbox_net.protocols import ndp
from arcbox_net.wire import MalformedFrame, ethernet, icmpv6, ipv6

GW_MAC = bytes.fromhex("02abcb000001")
TUNSETIFF = 0x400454CA
_NDP = range(icmpv6.TYPE_ROUTER_SOLICIT, icmpv6.TYPE_REDIRECT + 1)


class FrameLoop(threading.Thread):
    """The gateway side of the TAP, served from a thread until ``stop``."""

    def __init__(self, fd, mtu):
        super().__init__(daemon=True)
        self.fd = fd
        self.advertiser = ndp.RouterAdvertiser(GW_MAC, time.monotonic(), mtu=mtu,
                                               search=("example.internal",))
        self.responder = ndp.NdpResponder(GW_MAC, self.advertiser)
        self.echoes = 0
        self.malformed = 0
        self.stopping = threading.Event()

    def send(self, dst_mac, src, dst, nh, message, hop_limit):
        frame = ethernet.header(dst_mac, GW_MAC, ethernet.ETHERTYPE_IPV6) \
            + ipv6.build_header(src, dst, nh, len(message), ttl=hop_limit) + message
        try:
            os.write(self.fd, frame)
        except OSError:
            pass            # EIO until the guest sets the TAP up: the schedule resends

    def run(self):
        while not self.stopping.is_set():
            now = time.monotonic()
            for r in self.advertiser.poll(now):
                self.send(r.dst_mac, r.src_ip, r.dst_ip, 58, r.message, r.hop_limit)
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                self.serve(os.read(self.fd, 65536))

    def serve(self, frame):
        if ethernet.ethertype(frame) != ethernet.ETHERTYPE_IPV6:
            return
        try:
            ip = ipv6.parse(frame, ethernet.HEADER_LEN)
        except MalformedFrame:
            self.malformed += 1
            return
        if ip.protocol != ipv6.NH_ICMPV6 or ip.payload_end - ip.payload_offset < 8:
            return
        message = bytes(ip.payload(frame))
        if message[0] == icmpv6.TYPE_ECHO_REQUEST and ip.dst in self.responder.owned:
            if not icmpv6.verify(ip.src, ip.dst, message):
                self.malformed += 1
                return
            self.echoes += 1
            self.send(frame[6:12], ip.dst, ip.src, 58, icmpv6.echo_reply(ip.dst, ip.src, message),
                      64)
        elif message[0] in _NDP:
            for r in self.responder.handle(ip, message, frame[6:12], time.monotonic()):
                self.send(r.dst_mac, r.src_ip, r.dst_ip, 58, r.message, r.hop_limit)


def _open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), 0x0002 | 0x1000))
    return fd


def _wait(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    return check()


def test_a_linux_guest_configures_itself_from_the_ndp_core_and_pings_the_gateway(netns):
    tap = f"v6c{os.getpid() % 100000}"
    fd = _open_tap(tap)
    loop = FrameLoop(fd, mtu=1400)
    try:
        run(["ip", "link", "set", tap, "netns", netns])
        in_ns(netns, "sysctl", "-q", "-w", f"net.ipv6.conf.{tap}.accept_ra=2",
              f"net.ipv6.conf.{tap}.addr_gen_mode=0", f"net.ipv6.conf.{tap}.forwarding=0")
        mac = bytes.fromhex(in_ns(netns, "cat", f"/sys/class/net/{tap}/address").stdout.strip()
                            .replace(":", ""))
        loop.start()
        in_ns(netns, "ip", "link", "set", tap, "up")
        slaac = ipaddress.IPv6Address(b"\xfd" + bytes(7) + ipv6.interface_id(mac))

        def addresses():
            out = in_ns(netns, "ip", "-6", "-o", "addr", "show", "dev", tap).stdout
            return str(slaac) in out and "tentative" not in out.split(str(slaac))[1].split("\n")[0]
        assert _wait(addresses), in_ns(netns, "ip", "-6", "addr").stdout

        route = in_ns(netns, "ip", "-6", "route", "show", "default").stdout
        assert f"default via fe80::1 dev {tap} proto ra" in route, route
        lifetime = int(route.split("expires ")[1].split("sec")[0])
        assert 0 < lifetime <= 1800
        # The MTU option reached the kernel.
        assert in_ns(netns, "sysctl", "-n", f"net.ipv6.conf.{tap}.mtu").stdout.strip() == "1400"

        for target in ("fd00::1", f"fe80::1%{tap}"):
            result = in_ns(netns, "ping", "-6", "-c", "3", "-i", "0.3", "-W", "2", target,
                           check=False, timeout=30)
            assert result.returncode == 0 and " 3 received" in result.stdout, result.stdout
        neigh = in_ns(netns, "ip", "-6", "neigh", "show", "fd00::1").stdout
        assert "lladdr 02:ab:cb:00:00:01 router" in neigh, neigh
        assert loop.echoes >= 6 and loop.malformed == 0
        # The kernel's NDP traffic was all valid: only its DAD probes for its own addresses
        # were left unanswered (and counted).
        assert set(loop.responder.drops) <= {"ndp-not-ours"}, loop.responder.drops
        assert loop.advertiser.sent >= 1 and loop.responder.replies >= 2
    finally:
        loop.stopping.set()
        if loop.is_alive():
            loop.join(timeout=5)
        os.close(fd)
