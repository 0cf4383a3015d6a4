"""Open a TAP inside another process's namespaces, from a helper process.

A process may join a user namespace only while it has one thread, and the
stack's process has Twisted's (and may be anything an embedder made). So a
fresh ``python -m arcbox_net.slirp4netns.nsjoin`` does it: it joins the
target's user namespace (``/proc/PID/ns/user`` or ``userns``), then its
network namespace, opens (creating if needed) the TAP there with
``link.tap.open_tap``, optionally configures the interface as slirp4netns's
``--configure`` does, and sends the TAP's fds back over a unix socket with
SCM_RIGHTS, with a JSON status line. The fd keeps working from the host
namespaces once opened; the helper then exits.

``open_tap_via_helper`` is the caller's side.
"""

import ctypes
import fcntl
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCADDRT = 0x890B
SIOCSIFHWADDR = 0x8924
RTF_UP = 0x0001
RTF_GATEWAY = 0x0002
IFF_UP = 0x1
IFF_RUNNING = 0x40
ARPHRD_ETHER = 1
#: The status line is small; fds ride with it.
MAX_STATUS = 4096


class JoinError(Exception):
    """The namespaces or the TAP could not be had; the message says why."""


# -- the helper's side (runs in the fresh process) ------------------------------


def _same_namespace(path, own):
    try:
        a, b = os.stat(path), os.stat(own)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def join(pid=None, netns=None, userns=None):
    """Join the user namespace (if it is not ours already), then the network
    namespace. Like slirp4netns, a user namespace that cannot be joined is
    not an error by itself: the network namespace may still be ours to enter."""
    from ..link.tap import _setns
    if userns is None and pid is not None:
        userns = f"/proc/{pid}/ns/user"
    if netns is None:
        netns = f"/proc/{pid}/ns/net"
    userns_error = None
    if userns is not None and not _same_namespace(userns, "/proc/self/ns/user"):
        try:
            fd = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd, CLONE_NEWUSER)
            finally:
                os.close(fd)
        except OSError as e:
            userns_error = f"joining user namespace {userns} failed: {e.strerror}"
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise JoinError(f"cannot open network namespace {netns}: {e.strerror}") from None
    try:
        _setns(fd, CLONE_NEWNET)
    except OSError as e:
        why = f" ({userns_error})" if userns_error else ""
        raise JoinError(f"cannot enter network namespace {netns}: {e.strerror}{why}") from None
    finally:
        os.close(fd)


def _sockaddr_in(address):
    """struct sockaddr (16 bytes) holding an AF_INET address."""
    raw = struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", ipaddress.IPv4Address(address).packed)
    return (ctypes.c_ubyte * 16).from_buffer_copy(raw)


class _Rtentry(ctypes.Structure):
    """struct rtentry of <net/route.h> (SIOCADDRT), native layout."""

    _fields_ = [
        ("rt_pad1", ctypes.c_ulong),
        ("rt_dst", ctypes.c_ubyte * 16),
        ("rt_gateway", ctypes.c_ubyte * 16),
        ("rt_genmask", ctypes.c_ubyte * 16),
        ("rt_flags", ctypes.c_ushort),
        ("rt_pad2", ctypes.c_short),
        ("rt_pad3", ctypes.c_ulong),
        ("rt_pad4", ctypes.c_void_p),
        ("rt_metric", ctypes.c_short),
        ("rt_dev", ctypes.c_char_p),
        ("rt_mtu", ctypes.c_ulong),
        ("rt_window", ctypes.c_ulong),
        ("rt_irtt", ctypes.c_ushort),
    ]


def add_default_route(name, gateway):
    """``default via GATEWAY dev NAME`` with the routing ioctl (no ``ip`` needed)."""
    dev = ctypes.create_string_buffer(name.encode())
    rt = _Rtentry()
    rt.rt_dst = _sockaddr_in("0.0.0.0")
    rt.rt_gateway = _sockaddr_in(gateway)
    rt.rt_genmask = _sockaddr_in("0.0.0.0")
    rt.rt_flags = RTF_UP | RTF_GATEWAY
    rt.rt_dev = ctypes.cast(dev, ctypes.c_char_p)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s, SIOCADDRT, bytes(rt))
        except OSError as e:
            if e.errno != 17:  # EEXIST: the route is there already
                raise JoinError(f"cannot add default route via {gateway}: {e.strerror}") from None


def configure(name, address, prefixlen, gateway, mtu, mac=None):
    """What slirp4netns's --configure does: lo up; NAME up with the MTU, the
    MAC (if given), the address and the default route via the host."""
    from ..link.tap import TapError, _ifreq, configure_interface
    from ..wire.ethernet import mac_from_str
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s, 0x8914, _ifreq("lo", struct.pack("H", IFF_UP | IFF_RUNNING)))
            if mac is not None:
                hw = struct.pack("H6s8x", ARPHRD_ETHER, mac_from_str(mac))
                fcntl.ioctl(s, SIOCSIFHWADDR, _ifreq(name, hw))
        except OSError as e:
            raise JoinError(f"cannot configure {name}: {e.strerror}") from None
    try:
        configure_interface(name, address=address, prefixlen=prefixlen, mtu=mtu)
    except TapError as e:
        raise JoinError(str(e)) from None
    add_default_route(name, gateway)


def serve(sock, request):
    """Do ``request`` (the dict open_tap_via_helper sends) and answer on ``sock``."""
    from ..link.tap import TapError, close_all, open_tap
    fds = []
    try:
        join(request.get("pid"), request.get("netns"), request.get("userns"))
        try:
            fds, offloads = open_tap(request["tap"], offload=request.get("offload", True))
        except TapError as e:
            raise JoinError(str(e)) from None
        if request.get("configure"):
            configure(request["tap"], **request["configure"])
        status = {"ok": True, "offloads": offloads, "queues": len(fds)}
    except JoinError as e:
        close_all(fds)
        fds = []
        status = {"ok": False, "error": str(e)}
    socket.send_fds(sock, [json.dumps(status).encode()], fds)
    close_all(fds)
    return 0 if status["ok"] else 1


def helper_main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    fd, request = int(argv[0]), json.loads(argv[1])
    sock = socket.socket(fileno=fd)
    try:
        return serve(sock, request)
    finally:
        sock.close()


# -- the caller's side ----------------------------------------------------------


def open_tap_via_helper(tap, pid=None, netns=None, userns=None, offload=True,
                        configure=None, python=None, timeout=30):
    """Open TAP ``tap`` in the namespaces of ``pid`` (or at ``netns``) from a
    helper process; return (fds, offloads). Raises JoinError.

    ``configure`` is None or a dict of ``configure()``'s arguments (address,
    prefixlen, gateway, mtu, mac).
    """
    request = {"tap": tap, "pid": pid, "netns": netns, "userns": userns,
               "offload": offload, "configure": configure}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        cmd = [python or sys.executable, "-m", __name__, str(theirs.fileno()),
               json.dumps(request)]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as e:
            raise JoinError(f"cannot start the namespace helper: {e.strerror}") from None
        theirs.close()
        ours.settimeout(timeout)
        try:
            data, fds, _flags, _addr = socket.recv_fds(ours, MAX_STATUS, 16)
        except (TimeoutError, OSError) as e:
            proc.kill()
            raise JoinError(f"the namespace helper did not answer: {e}") from None
        finally:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        ours.close()
        theirs.close()
    try:
        status = json.loads(data or b"{}")
    except ValueError:
        status = {}
    if not status.get("ok"):
        for fd in fds:
            os.close(fd)
        raise JoinError(status.get("error")
                        or f"the namespace helper failed (exit status {proc.returncode})")
    if not fds:
        raise JoinError("the namespace helper sent no TAP fd")
    for fd in fds:
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    return fds, int(status.get("offloads") or 0)


if __name__ == "__main__":
    sys.exit(helper_main())
