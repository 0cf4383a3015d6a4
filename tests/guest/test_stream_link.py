"""Unix-socket links: stream framing (sans-I/O), stream and dgram links over real
sockets driven without a running reactor, and socket-file handling."""

import errno
import os
import select
import socket
import stat
import struct

import pytest
from framebuild import DescriptorReactor as _Reactor
from framebuild import RecordingSink as Sink
from zope.interface import implementer
from zope.interface.verify import verifyObject

from arcbox_net.config import StackConfig
from arcbox_net.interfaces import IFrameSink, ILink
from arcbox_net.link import open_link
from arcbox_net.link.dgram import DgramListenLink
from arcbox_net.link.socket import SocketFrameLink
from arcbox_net.link.stream import (
    IOV_BATCH,
    FramingError,
    StreamDecoder,
    StreamLink,
    StreamListenLink,
    encode,
)
from arcbox_net.link.unixsock import SocketPathError


def frame(n, size=60):
    """A recognisable frame: ``n`` repeated, at least an Ethernet header long."""
    return (n.to_bytes(2, "big") * (size // 2 + 1))[:size]


@implementer(IFrameSink)
def recv_frames(sock, count, timeout=5):
    sock.settimeout(timeout)
    d = StreamDecoder()
    got = []
    while len(got) < count:
        data = sock.recv(1 << 20)
        assert data, "EOF"
        got += d.feed(data)
    return got


def connected_link(mtu=1500):
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reactor = _Reactor()
    link = StreamLink.from_socket(ours, mtu=mtu, reactor=reactor)
    sink = Sink()
    link.start(sink)
    return link, peer, sink, reactor


def test_stream_link_provides_ilink():
    link, peer, sink, reactor = connected_link()
    verifyObject(ILink, link)
    assert "stream socket" in link.description


def test_stream_link_reads_split_frames_and_writes_frames():
    link, peer, sink, reactor = connected_link()
    (peer_reader,) = reactor.readers
    frames = [frame(i, 60 + i) for i in range(10)]
    data = b"".join(encode(f) for f in frames)
    peer.send(data[:7])
    peer_reader.doRead()
    assert sink.frames == []
    peer.send(data[7:500])
    peer_reader.doRead()
    peer.send(data[500:])
    peer_reader.doRead()
    assert sink.frames == frames
    link.send_frame(frame(100))
    link.send_frame([b"\x02" * 14, memoryview(b"payload")])
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(1)              # gathered until the end of the reactor turn
    peer.setblocking(True)
    reactor.advance(0)
    assert recv_frames(peer, 2) == [frame(100), b"\x02" * 14 + b"payload"]
    assert link.frames_in == 10 and link.frames_out == 2


class CountingSocket:
    """A socket whose sendmsg calls are counted; the first ``refusals`` of them
    fail with ENOBUFS (the kernel had no memory)."""

    def __init__(self, sock, refusals=0):
        self._sock = sock
        self.sendmsg_calls = 0
        self.refusals = refusals

    def sendmsg(self, buffers):
        self.sendmsg_calls += 1
        if self.refusals:
            self.refusals -= 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return self._sock.sendmsg(buffers)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_stream_link_gathers_a_turns_frames_into_few_sendmsg_calls():
    link, peer, sink, reactor = connected_link()
    (stream_peer,) = reactor.readers
    counting = stream_peer.sock = CountingSocket(stream_peer.sock)
    frames = [frame(i, 1514) for i in range(100)]
    for f in frames:
        link.send_frame(f)
    assert counting.sendmsg_calls == 0
    reactor.advance(0)
    assert recv_frames(peer, 100) == frames
    # 100 length prefixes and 100 frames, IOV_BATCH buffers per call.
    assert counting.sendmsg_calls <= -(-200 // IOV_BATCH)
    assert link.frames_out == 100 and link.queued_frames == 0


def test_stream_link_read_budget_spreads_a_burst_over_wakeups():
    link, peer, sink, reactor = connected_link()
    link.read_budget = 10
    (r,) = reactor.readers
    peer.send(b"".join(encode(frame(i)) for i in range(25)))
    r.doRead()
    assert len(sink.frames) >= 10
    while len(sink.frames) < 25:
        r.doRead()
    assert sink.frames == [frame(i) for i in range(25)]


def test_stream_link_write_queue_survives_a_full_socket():
    link, peer, sink, reactor = connected_link()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    link._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = [i.to_bytes(4, "big") * 2000 for i in range(300)]  # 8 KB each
    for f in frames:
        link.send_frame(f)
    reactor.advance(0)
    assert link.queued_frames > 0 and reactor.writers
    (w,) = reactor.writers
    got = []
    d = StreamDecoder()
    peer.setblocking(False)
    while len(got) < len(frames):
        try:
            got += d.feed(peer.recv(1 << 16))
        except BlockingIOError:
            w.doWrite()
    assert got == frames
    assert link.queued_frames == 0 and not reactor.writers
    assert link.queued_high_water > 0


def test_stream_link_waits_out_no_buffer_space_on_a_timer():
    link, peer, sink, reactor = connected_link()
    (stream_peer,) = reactor.readers
    stream_peer.sock = CountingSocket(stream_peer.sock, refusals=3)
    link.send_frame(frame(1))
    reactor.advance(0)
    link.send_frame(frame(2))
    # The socket polls writable all the while: waiting for that would spin.
    assert not reactor.writers and link.queued_frames == 2
    reactor.pump([0.001] * 20)
    assert recv_frames(peer, 2) == [frame(1), frame(2)]
    assert not sink.lost and link.queued_frames == 0 and not reactor.writers
    assert stream_peer.sock.refusals == 0


def test_stream_link_peer_eof_is_link_lost_once():
    link, peer, sink, reactor = connected_link()
    (r,) = reactor.readers
    peer.send(encode(frame(1)))
    peer.close()
    r.doRead()
    assert sink.frames == [frame(1)]
    assert len(sink.lost) == 1 and not reactor.readers
    link.send_frame(frame(2))  # ignored after the loss
    link.stop()
    assert len(sink.lost) == 1


def test_stream_link_garbage_is_reported_and_closes():
    link, peer, sink, reactor = connected_link()
    (r,) = reactor.readers
    peer.send(encode(frame(1)) + b"\xff\xff\xff\xff garbage")
    r.doRead()
    assert sink.frames == [frame(1)]
    assert len(sink.lost) == 1 and isinstance(sink.lost[0], FramingError)
    assert peer.recv(10) == b""  # our end was closed


def test_stream_link_drops_and_counts_frames_above_the_mtu():
    link, peer, sink, reactor = connected_link(mtu=1500)
    (r,) = reactor.readers
    ok = frame(1, 1500 + 18)
    peer.send(encode(frame(0)) + encode(frame(2, 1500 + 19)) + encode(frame(3, 9000)) + encode(ok))
    r.doRead()
    assert sink.frames == [frame(0), ok]
    assert link.drops["oversize-frame"] == 2
    assert not sink.lost  # the stream stays in step


def listening_link(tmp_path, mtu=1500):
    path = str(tmp_path / "s.sock")
    reactor = _Reactor()
    link = StreamListenLink.listen(path, mtu=mtu, reactor=reactor)
    sink = Sink()
    link.start(sink)
    return link, path, sink, reactor


def connect_peer(link, path, reactor):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    link.doRead()  # accept
    return c


def peer_reader(link, reactor):
    return next(r for r in reactor.readers if r is not link)


def test_listen_stream_serves_successive_peers_without_losing_the_link(tmp_path):
    link, path, sink, reactor = listening_link(tmp_path)
    verifyObject(ILink, link)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    link.send_frame(frame(0))  # nobody to send to yet
    assert link.drops["no-peer"] == 1

    for n in range(3):
        c = connect_peer(link, path, reactor)
        assert link.connected
        c.send(encode(frame(n)))
        peer_reader(link, reactor).doRead()
        assert sink.frames[-1] == frame(n)
        link.send_frame(frame(10 + n))
        reactor.advance(0)
        assert recv_frames(c, 1) == [frame(10 + n)]
        c.close()
        peer_reader(link, reactor).doRead()  # EOF
        assert not link.connected and reactor.readers == {link}
    assert sink.lost == []
    assert link.peers_served == 3
    link.stop()
    assert not os.path.exists(path)


def test_listen_stream_refuses_a_second_peer_while_one_is_served(tmp_path):
    link, path, sink, reactor = listening_link(tmp_path)
    first = connect_peer(link, path, reactor)
    second = connect_peer(link, path, reactor)
    second.settimeout(5)
    assert second.recv(10) == b""  # closed at once
    assert link.peers_refused == 1
    link.send_frame(frame(1))
    reactor.advance(0)
    assert recv_frames(first, 1) == [frame(1)]
    link.stop()


@pytest.mark.parametrize("junk", [
    struct.pack(">I", 0),
    struct.pack(">I", 5) + b"short",
    struct.pack(">I", 1 << 31),
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_listen_stream_recovers_from_a_bad_peer(tmp_path, junk):
    link, path, sink, reactor = listening_link(tmp_path)
    bad = connect_peer(link, path, reactor)
    bad.send(encode(frame(1)) + junk)
    peer_reader(link, reactor).doRead()
    assert sink.frames == [frame(1)]
    assert not link.connected and sink.lost == []
    bad.settimeout(5)
    assert bad.recv(10) == b""
    good = connect_peer(link, path, reactor)
    good.send(encode(frame(2)))
    peer_reader(link, reactor).doRead()
    assert sink.frames == [frame(1), frame(2)]
    link.stop()


def test_listen_stream_drops_unsent_frames_of_a_departed_peer(tmp_path):
    link, path, sink, reactor = listening_link(tmp_path)
    c = connect_peer(link, path, reactor)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer = peer_reader(link, reactor)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for i in range(200):
        link.send_frame(b"\x01" * 8000)
    reactor.advance(0)
    assert link.queued_frames > 0
    c.close()
    peer.doWrite()  # EPIPE/ECONNRESET: the peer is gone, not the link
    assert not link.connected and sink.lost == []
    assert link.drops["no-peer"] > 0
    link.stop()


def test_listen_stream_replaces_a_stale_socket_file(tmp_path):
    path = str(tmp_path / "s.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()  # the file stays: a stale socket
    link = StreamListenLink.listen(path, reactor=_Reactor())
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    link.stop()


def test_listen_refuses_a_regular_file_and_a_live_socket(tmp_path):
    path = tmp_path / "file"
    path.write_text("precious")
    with pytest.raises(SocketPathError, match="not a socket"):
        StreamListenLink.listen(str(path), reactor=_Reactor())
    with pytest.raises(SocketPathError, match="not a socket"):
        DgramListenLink.listen(str(path), reactor=_Reactor())
    assert path.read_text() == "precious"
    link, sock_path, sink, reactor = listening_link(tmp_path)
    with pytest.raises(SocketPathError, match="in use"):
        StreamListenLink.listen(sock_path, reactor=_Reactor())
    with pytest.raises(SocketPathError, match="in use"):
        DgramListenLink.listen(sock_path, reactor=_Reactor())
    link.stop()


def test_stop_leaves_a_socket_file_that_is_no_longer_ours(tmp_path):
    link, path, sink, reactor = listening_link(tmp_path)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    link.stop()
    assert os.path.exists(path)
    other.close()


def test_connect_stream(tmp_path):
    path = str(tmp_path / "qemu.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    reactor = _Reactor()
    link = StreamLink.connect(path, reactor=reactor)
    sink = Sink()
    link.start(sink)
    conn, _ = server.accept()
    conn.send(encode(frame(4)))
    (r,) = reactor.readers
    r.doRead()
    assert sink.frames == [frame(4)]
    link.send_frame(frame(5))
    reactor.advance(0)
    assert recv_frames(conn, 1) == [frame(5)]
    conn.close()
    r.doRead()
    assert len(sink.lost) == 1
    with pytest.raises(ValueError, match="cannot connect"):
        StreamLink.connect(str(tmp_path / "nothing.sock"), reactor=reactor)


def test_open_link_detects_the_fd_socket_type():
    config = StackConfig()
    for kind, cls in ((socket.SOCK_STREAM, StreamLink), (socket.SOCK_DGRAM, SocketFrameLink),
                      (socket.SOCK_SEQPACKET, SocketFrameLink)):
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        link = open_link(config, fd=os.dup(a.fileno()), reactor=_Reactor())
        assert isinstance(link, cls), kind
        link.stop()
        a.close()
        b.close()
    with pytest.raises(ValueError, match="give exactly one of"):
        open_link(config, listen_stream="/x", listen_dgram="/y")


def dgram_link(tmp_path, mtu=1500):
    path = str(tmp_path / "d.sock")
    reactor = _Reactor()
    link = DgramListenLink.listen(path, mtu=mtu, reactor=reactor)
    sink = Sink()
    link.start(sink)
    return link, path, sink, reactor


def dgram_peer(tmp_path, name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / name))
    s.settimeout(5)
    return s


def dgram_link_with_full_peer(tmp_path, count):
    """A dgram link whose peer (a bound socket that does not read yet) has been
    sent ``count`` frames, more than its queue holds; (link, sink, reactor,
    vm, frames)."""
    link, path, sink, reactor = dgram_link(tmp_path)
    vm = dgram_peer(tmp_path, "vm.sock")
    vm.sendto(frame(1), path)
    link.doRead()
    frames = [frame(i, 1500) for i in range(count)]
    for f in frames:
        link.send_frame(f)
    assert link.queued_frames > 0  # the peer's queue is short (net.unix.max_dgram_qlen)
    return link, sink, reactor, vm, frames


def receive_all(vm, count, when_empty):
    """Read ``count`` datagrams from ``vm``, calling ``when_empty()`` each time
    none is waiting (the test's turn to drive the link); return them."""
    got = []
    vm.setblocking(False)
    while len(got) < count:
        try:
            got.append(vm.recv(65536))
        except BlockingIOError:
            when_empty()
    return got


def test_listen_dgram_learns_the_peer_and_replies(tmp_path):
    link, path, sink, reactor = dgram_link(tmp_path)
    verifyObject(ILink, link)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    link.send_frame(frame(0))
    assert link.drops["no-peer"] == 1
    vm = dgram_peer(tmp_path, "vm.sock")
    vm.sendto(b"VFKT", path)  # vfkit's hello: not a frame
    vm.sendto(frame(1), path)
    link.doRead()
    assert sink.frames == [frame(1)]
    assert link.peer == str(tmp_path / "vm.sock")
    link.send_frame(frame(2))
    link.send_frame([b"\x03" * 14, memoryview(b"gathered")])
    assert vm.recv(65536) == frame(2)
    assert vm.recv(65536) == b"\x03" * 14 + b"gathered"
    # While the peer talks, the link is associated with it: another sender is refused.
    vm2 = dgram_peer(tmp_path, "vm2.sock")
    with pytest.raises(PermissionError):
        vm2.sendto(frame(3), path)
    # A restarted VM with a new socket: heard once the old peer has been quiet
    # for a period, and replies follow the latest sender.
    vm.close()
    reactor.advance(link.peer_idle)
    reactor.advance(link.peer_idle)
    vm2.sendto(frame(3), path)
    link.doRead()
    link.send_frame(frame(4))
    assert vm2.recv(65536) == frame(4)
    # The peer goes away: logged and forgotten, the link stays.
    vm2.close()
    link.send_frame(frame(5))
    assert link.peer is None and sink.lost == []
    assert link.drops["no-peer"] == 2
    link.stop()
    assert not os.path.exists(path)


def test_listen_dgram_peer_sends_are_bounded_by_its_buffer_not_the_qlen(tmp_path):
    """Associated with the peer, the link takes far more than net.unix.max_dgram_qlen
    datagrams before the peer's send would block, and the peer's socket then polls
    not-writable (it waits instead of spinning on EAGAIN, as QEMU's dgram did)."""
    link, path, sink, reactor = dgram_link(tmp_path)
    vm = dgram_peer(tmp_path, "vm.sock")
    vm.sendto(frame(0), path)
    link.doRead()                      # learned and associated
    vm.setblocking(False)
    sent = 0
    with pytest.raises(BlockingIOError):
        while sent < 100000:
            vm.sendto(frame(sent, 1500), path)
            sent += 1
    with open("/proc/sys/net/unix/max_dgram_qlen") as f:
        qlen = int(f.read())
    assert sent > 4 * qlen
    assert select.select([], [vm], [], 0)[1] == []    # full: the sender polls not writable
    while link.doRead() is None and len(sink.frames) < sent + 1:
        pass
    assert len(sink.frames) == sent + 1
    assert select.select([], [vm], [], 1)[1] == [vm]  # drained: writable again
    # Quiet for two periods: the association is dissolved, replies still reach the peer.
    reactor.advance(link.peer_idle)
    reactor.advance(link.peer_idle)
    other = dgram_peer(tmp_path, "other.sock")
    other.sendto(frame(1), path)       # any sender is heard again
    link.doRead()
    assert link.peer == str(tmp_path / "other.sock")
    link.stop()


def test_listen_dgram_drops_oversize_frames(tmp_path):
    link, path, sink, reactor = dgram_link(tmp_path, mtu=1500)
    vm = dgram_peer(tmp_path, "vm.sock")
    vm.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    vm.sendto(frame(1, 1519), path)
    vm.sendto(frame(2, 65000), path)
    vm.sendto(frame(3, 1518), path)
    link.doRead()
    assert sink.frames == [frame(3, 1518)]
    assert link.drops["oversize-frame"] == 2
    link.stop()


def test_listen_dgram_waits_for_room_in_the_peers_queue(tmp_path):
    """Frames beyond the peer's short queue (net.unix.max_dgram_qlen) wait on a
    socket connected to the peer, which the kernel reports writable only when
    the peer has room: no timer, no spinning."""
    link, sink, reactor, vm, frames = dgram_link_with_full_peer(tmp_path, 200)
    link.doWrite()              # our own socket polls writable: the reactor calls this
    (room,) = reactor.writers
    assert room is not link and link._retry is None     # no timer
    assert select.select([], [room], [], 0)[1] == []   # the peer is full: not writable

    def write_what_is_ready():
        ready = select.select([], list(reactor.writers), [], 2)[1]
        assert ready, "the peer read, yet nothing became writable"
        for writer in ready:
            writer.doWrite()

    assert receive_all(vm, len(frames), write_what_is_ready) == frames
    assert not reactor.writers and link.queued_frames == 0
    link.stop()


@pytest.mark.parametrize("how", ["writable", "hang-up"])
def test_listen_dgram_peer_leaving_while_full_drops_the_queue(tmp_path, how):
    """The peer goes away while frames wait for room: they are counted as
    no-peer drops, nothing stays registered, the link lives on."""
    link, sink, reactor, vm, _frames = dgram_link_with_full_peer(tmp_path, 50)
    link.doWrite()
    (room,) = reactor.writers
    queued = link.queued_frames
    assert queued > 0
    vm.close()
    os.unlink(str(tmp_path / "vm.sock"))
    if how == "writable":
        assert select.select([], [room], [], 2)[1] == [room]
        room.doWrite()
    else:
        reactor.removeWriter(room)      # what the reactor does on EPOLLHUP/EPOLLERR
        room.connectionLost(None)
    while link in reactor.writers:
        link.doWrite()
    assert link.queued_frames == 0 and not reactor.writers
    assert link.peer is None and sink.lost == []
    assert link.drops["no-peer"] == queued
    link.stop()


def test_listen_dgram_retries_later_when_the_peer_cannot_be_watched(tmp_path, monkeypatch):
    """No watcher socket (here: out of fds): a timer retries instead."""
    from arcbox_net.link import dgram as dgram_module

    def no_fds(*args):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(dgram_module, "_PeerRoom", no_fds)
    link, sink, reactor, vm, frames = dgram_link_with_full_peer(tmp_path, 200)
    spins = []

    def write_or_wait():
        if link in reactor.writers:
            link.doWrite()
            assert link not in reactor.writers or not link.queued_frames
        else:
            assert not reactor.writers
            reactor.advance(link.retry_delay)  # the retry timer puts it back
        spins.append(1)
        assert len(spins) < 10000

    assert receive_all(vm, len(frames), write_or_wait) == frames
    link.stop()


def test_fd_dgram_link_drops_oversize_frames():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    link = SocketFrameLink(a, mtu=1500, reactor=_Reactor())
    sink = Sink()
    link.start(sink)
    b.send(frame(1, 1600))
    b.send(frame(2, 1518))
    link.doRead()
    assert sink.frames == [frame(2, 1518)]
    assert link.drops["oversize-frame"] == 1
    link.stop()
