"""Helpers shared by the unix-socket links (stream and datagram).

- ``max_frame_len``: the largest frame a link of a given MTU accepts from the
  guest (MTU + 14 bytes of Ethernet header + 4 of VLAN tag slack); bigger
  frames are dropped and counted by the link.
- ``size_buffers``: socket buffers big enough for 64 KiB frames. An AF_UNIX
  datagram is charged against the receiver's buffer, so both ends need them;
  we can only size ours (the docs tell users about the other end).
- ``bind_unix``: create a listening/bound socket at a path, mode 0600,
  replacing a stale socket file but never another kind of file, and never a
  socket some other process still serves.
- ``disconnect``: undo a datagram socket's connect() (Python's connect takes
  no AF_UNSPEC address for AF_UNIX sockets).
"""

import ctypes
import ctypes.util
import errno
import os
import socket
import stat

#: Room for 64 KiB frames (and many of them in flight) on our end.
SOCKET_BUFFER = 4 * 1024 * 1024
#: Ethernet header plus one VLAN tag: what a frame may carry beyond the MTU.
FRAME_OVERHEAD = 14 + 4


def max_frame_len(mtu):
    return mtu + FRAME_OVERHEAD


def size_buffers(sock, size=SOCKET_BUFFER):
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


class SocketPathError(ValueError):
    """A socket path cannot be used; the message says why."""


def _in_use(path, kind):
    """True if some process still serves the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.settimeout(1)
        probe.connect(path)
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if e.errno == errno.EPROTOTYPE:  # a socket of the other kind is bound there
            return True
        return False
    finally:
        probe.close()


def remove_stale_socket(path, kind):
    """Unlink ``path`` if it is a socket nobody serves; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise SocketPathError(f"cannot use {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; not replacing it")
    if _in_use(path, kind):
        raise SocketPathError(f"{path} is in use by another process")
    try:
        os.unlink(path)
    except OSError as e:
        raise SocketPathError(f"cannot remove stale socket {path}: {e.strerror}") from None


def bind_unix(path, kind):
    """A non-blocking AF_UNIX socket of ``kind`` bound at ``path`` with mode 0600.

    Returns ``(sock, inode)``; the inode lets the owner remove the file at
    stop only if it is still the one it created.
    """
    path = os.fspath(path)
    if not path:
        raise SocketPathError("an empty socket path")
    if len(os.fsencode(path)) >= 108:
        raise SocketPathError(f"socket path {path!r} is too long (unix sockets allow 107 bytes)")
    remove_stale_socket(path, kind)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # the file is created 0600 by bind(): no window
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise SocketPathError(f"cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, 0o600)
        inode = os.stat(path).st_ino
    except OSError:
        inode = None
    size_buffers(sock)
    sock.setblocking(False)
    return sock, inode


def unlink_if_ours(path, inode):
    """Remove the socket file at ``path`` if it is still the one we bound."""
    if path is None or inode is None:
        return
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


_libc = None


def disconnect(sock):
    """Dissolve ``sock``'s association with its datagram peer (connect to an
    AF_UNSPEC address); it then takes datagrams from any sender again."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    unspec = (ctypes.c_ushort * 8)(socket.AF_UNSPEC)
    if _libc.connect(sock.fileno(), ctypes.byref(unspec), ctypes.sizeof(unspec)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
