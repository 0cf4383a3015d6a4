"""``--tap NAME``: a TAP device; ``--netns``: a TAP created inside a namespace.

The stack holds the TAP's fd; the kernel on the other side is the guest.
For ``--netns`` the device is created from a short-lived thread that has
joined the target namespace (namespaces are per thread on Linux), so the
stack itself never leaves the host namespace, as slirp4netns does. The fd
keeps working from any namespace once opened.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
import threading

from ..wire import vnet
from .base import FrameLink, LinkLost
from .vnethdr import VnetFraming

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
_SIOCGIFHWADDR = 0x8927
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
#: Queues of one TAP we serve at most (one process each).
MAX_QUEUES = 16
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
#: What TUNSETOFFLOAD is asked for, best first: checksums and TSO for both
#: families, then without TSO6 (a kernel that refuses the combination; the
#: framer then sends IPv6 TCP one MSS per frame), then nothing.
OFFLOAD_CHOICES = (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, TUN_F_CSUM | TUN_F_TSO4)

#: Every frame on an IFF_VNET_HDR fd starts with a legacy virtio_net_hdr.
VNET_HDR_LEN = vnet.HEADER_LEN

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000


def _setns(fd, nstype):
    """os.setns only exists from Python 3.12; libc has it everywhere."""
    if hasattr(os, "setns"):
        return os.setns(fd, nstype)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class TapError(Exception):
    """A TAP device or namespace could not be set up; the message says why."""


def open_tap(name, offload=False, queues=1):
    """Open (creating if needed) TAP ``name`` in the calling thread's namespace.

    With ``offload`` the fd carries a virtio_net_hdr before each frame and the
    kernel is told we handle partial checksums and TSO: the guest then sends
    64 KiB TCP frames and accepts them from us. ``queues`` > 1 opens a
    multi-queue TAP, one fd per queue: the kernel spreads the guest's flows
    over them by hash and keeps each flow on the queue that last wrote it.
    Returns (fds, offloads): the TUN_F_* flags every queue accepted (0 for
    none; true whenever checksum offload and TSO4 are on).
    """
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
        raise TapError(f"{name!r} is not a valid interface name")
    if not isinstance(queues, int) or not 1 <= queues <= MAX_QUEUES:
        raise TapError(f"queues must be 1..{MAX_QUEUES}, not {queues!r}")
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
    if queues > 1:
        flags |= IFF_MULTI_QUEUE
    fds = []
    offloads = OFFLOAD_CHOICES[0] if offload else 0
    try:
        for _ in range(queues):
            fd, on = _open_queue(name, flags, offload)
            fds.append(fd)
            offloads &= on
    except TapError:
        close_all(fds)
        raise
    return fds, offloads


def close_all(fds):
    """Close each fd (a TAP's queues), whatever state it is in."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_queue(name, flags, offload):
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as e:
        os.close(fd)
        hint = ""
        if e.errno == 16:
            hint = " (is it a TUN device, or held by another process?)"
        elif e.errno == 22 and flags & IFF_MULTI_QUEUE:
            hint = " (an existing device must have been created multi-queue for --queues)"
        raise TapError(f"cannot attach to TAP {name}: {e.strerror}{hint}") from None
    if not offload:
        return fd, 0
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    except OSError:
        return fd, 0  # the header stays; frames just carry no offload work
    for asked in OFFLOAD_CHOICES:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, asked)
        except OSError:
            continue
        return fd, asked
    return fd, 0


def _ifreq(name, payload=b""):
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def _sockaddr_in(address):
    return struct.pack("HH4s8x", socket.AF_INET, 0, ipaddress.IPv4Address(address).packed)


def configure_interface(name, address=None, prefixlen=None, mtu=None, gateway=None):
    """Bring ``name`` up, optionally with an address, MTU and default route.

    Works in the calling thread's namespace (ioctl on a fresh socket, and
    ``ip route`` for the route: a child process inherits the thread's
    namespace).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            if mtu is not None:
                fcntl.ioctl(s, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
            if address is not None:
                fcntl.ioctl(s, SIOCSIFADDR, _ifreq(name, _sockaddr_in(address)))
                mask = ipaddress.IPv4Network(f"0.0.0.0/{prefixlen}").netmask
                fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(mask)))
            flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name)), 16)[0]
            fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
        except OSError as e:
            raise TapError(f"cannot configure {name}: {e.strerror}") from None
    if gateway is not None:
        result = subprocess.run(
            ["ip", "-4", "route", "replace", "default", "via", str(gateway), "dev", name],
            capture_output=True, text=True)
        if result.returncode:
            raise TapError(f"cannot add default route via {gateway}: {result.stderr.strip()}")


def resolve_netns(name_or_path):
    """A namespace name (as in ``ip netns``) or a path such as /proc/PID/ns/net."""
    if "/" in name_or_path:
        path = name_or_path
    else:
        path = os.path.join("/var/run/netns", name_or_path)
    if not os.path.exists(path):
        raise TapError(f"network namespace {name_or_path!r} not found ({path} does not exist)")
    return path


def interface_mac(fd):
    """The MAC of the TAP interface behind ``fd`` (SIOCGIFHWADDR on the fd
    itself works from any namespace), or None."""
    try:
        ifr = fcntl.ioctl(fd, _SIOCGIFHWADDR, bytes(40))
    except OSError:
        return None
    return bytes(ifr[18:24])


def open_tap_in_netns(netns, name, configure=None, offload=False, queues=1):
    """Create TAP ``name`` inside ``netns``; return (fds, offloads_on) as open_tap.

    ``configure`` is None or a dict of configure_interface() arguments.
    """
    path = resolve_netns(netns)
    result = {}

    def work():
        try:
            nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            result["error"] = TapError(f"cannot open namespace {path}: {e.strerror}")
            return
        try:
            _setns(nsfd, CLONE_NEWNET)
        except OSError as e:
            result["error"] = TapError(f"cannot enter namespace {path}: {e.strerror}")
            return
        finally:
            os.close(nsfd)
        try:
            fds, offloads = open_tap(name, offload, queues)
            try:
                configure_interface(name, **(configure or {}))
            except TapError:
                close_all(fds)
                raise
            result["fd"] = (fds, offloads)
        except TapError as e:
            result["error"] = e
        except Exception as e:  # never leave the caller without an answer
            result["error"] = TapError(f"cannot create {name} in {path}: {e}")

    # The thread ends in the namespace and is discarded with it.
    thread = threading.Thread(target=work, name=f"arcbox-netns-{name}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["fd"]


class TapLink(FrameLink):
    """A TAP fd: one read is one frame, one write is one frame.

    ``open``/``open_in_netns`` enable offloads by default (``offload=True``)
    and then return a VnetTapLink when the kernel agrees. With ``queues`` > 1
    the link reads the first queue; ``extra_queues`` holds the fds of the
    others until the stack hands them to worker processes (or the link closes
    them when it stops).
    """

    def __init__(self, fd, description, mtu=1500, reactor=None):
        super().__init__(fd, description, mtu=mtu, reactor=reactor, owns_fd=True)
        #: fds of the TAP's other queues, still ours to close (see multiqueue).
        self.extra_queues = []

    @classmethod
    def from_fds(cls, fds, vnet, offloads, description, mtu, reactor):
        """A link on open TAP queue fds (the first is read; see extra_queues):
        a VnetTapLink if they carry virtio-net headers (``vnet``)."""
        if vnet:
            link = VnetTapLink(fds[0], description, mtu=mtu, reactor=reactor)
            link.offloads = bool(offloads)
            # True (a caller that kept only "on"): the first choice, TSO6 included.
            link.tso6 = offloads is True or bool(offloads & TUN_F_TSO6)
        else:
            link = cls(fds[0], description, mtu=mtu, reactor=reactor)
        link.extra_queues = list(fds[1:])
        return link

    @classmethod
    def open(cls, name, mtu=1500, reactor=None, offload=True, queues=1):
        fds, offloads = open_tap(name, offload, queues)
        try:
            configure_interface(name)
        except TapError:
            close_all(fds)
            raise
        return cls.from_fds(fds, offload, offloads, f"tap {name}", mtu, reactor)

    @classmethod
    def open_in_netns(cls, netns, name="tap0", mtu=1500, configure=None, reactor=None,
                      offload=True, queues=1):
        fds, offloads = open_tap_in_netns(netns, name, configure, offload, queues)
        link = cls.from_fds(fds, offload, offloads, f"tap {name} in netns {netns}", mtu,
                            reactor)
        if configure is not None:
            # The stack gave this interface the guest address itself: its MAC
            # is the one the address belongs to (neighbours.py binds them).
            link.guest_mac = interface_mac(fds[0])
        return link

    def _write_failed(self, error):
        """EIO is a TAP whose interface is down (the guest took its NIC down,
        or has not set it up yet): the frame is dropped and counted as
        ``tap-down`` and the link stays, for the guest may set it up again.
        (Router advertisements and forwards write with no guest frame first.)"""
        if error.errno == errno.EIO:
            self._queue.popleft()
            self._drop("tap-down", error)
            return True
        return super()._write_failed(error)

    def stop(self):
        super().stop()
        extra, self.extra_queues = self.extra_queues, []
        close_all(extra)


class VnetTapLink(VnetFraming, TapLink):
    """A TAP fd with IFF_VNET_HDR: a virtio_net_hdr rides before every frame.

    Reading strips it (partial checksums need no work: the stack does not
    verify TCP/UDP checksums of frames that come from the local kernel, and
    its headers are taken as they come). ``offloads`` says whether the kernel
    accepted TSO/checksum offload, i.e. whether the framer may hand it 64 KiB
    GSO segments, and ``tso6`` whether that covers TCP over IPv6. The guest's
    own TSO frames (GSO_TCPV4 and GSO_TCPV6 alike) arrive whole, up to 64 KiB
    of IP, and go to the dispatcher as one segment each.
    """

    vnet_header_len = VNET_HDR_LEN
    validate_vnet = False

    def _read(self):
        data = os.read(self._fd, self.read_size)
        if len(data) <= VNET_HDR_LEN:
            if not data:
                raise LinkLost("end of file")
            return None
        return data[VNET_HDR_LEN:]

    def _send_framed(self, buffers):
        FrameLink.send_frame(self, buffers)
