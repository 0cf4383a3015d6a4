"""Frame links over real socketpairs, driven without a running reactor."""

import errno
import socket

import pytest
from zope.interface import implementer

from framebuild import DescriptorReactor as _Reactor, RecordingSink as Sink
from arcbox_net.interfaces import IFrameSink
from arcbox_net.link.socket import SocketFrameLink


@implementer(IFrameSink)
def make(kind=socket.SOCK_DGRAM):
    ours, peer = socket.socketpair(socket.AF_UNIX, kind)
    reactor = _Reactor()
    link = SocketFrameLink(ours, reactor=reactor)
    sink = Sink()
    link.start(sink)
    return link, peer, sink, reactor


def test_reads_a_batch_until_eagain_within_budget():
    link, peer, sink, reactor = make()
    link.read_budget = 10
    for i in range(25):
        peer.send(bytes([i]) * 60)
    link.doRead()
    link.doRead()
    link.doRead()
    link.doRead()
    sizes = [len(b) for b in sink.batches]
    assert sizes == [10, 10, 5]
    assert [f[0] for b in sink.batches for f in b] == list(range(25))


def test_write_queue_never_drops_on_eagain():
    link, peer, sink, reactor = make()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    link._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = [i.to_bytes(4, "big") * 375 for i in range(400)]
    for f in frames:
        link.send_frame(f)
    assert link.queued_frames > 0 and link in reactor.writers
    received = []
    peer.setblocking(False)
    while len(received) < len(frames):
        try:
            received.append(peer.recv(65536))
        except BlockingIOError:
            link.doWrite()
    assert received == frames
    assert link.queued_frames == 0 and link not in reactor.writers


def test_gathered_frames_are_one_datagram():
    link, peer, sink, reactor = make(socket.SOCK_SEQPACKET)
    link.send_frame([b"head", memoryview(b"-payload")])
    assert peer.recv(100) == b"head-payload"


def test_seqpacket_eof_reports_link_lost_once():
    link, peer, sink, reactor = make(socket.SOCK_SEQPACKET)
    peer.send(b"x" * 20)
    peer.close()
    link.doRead()
    assert sink.batches == [[b"x" * 20]]
    assert len(sink.lost) == 1 and link not in reactor.readers
    link.doRead if False else None
    link.send_frame(b"after")  # ignored, no exception


def test_dgram_peer_gone_is_noticed_on_write():
    link, peer, sink, reactor = make(socket.SOCK_DGRAM)
    peer.close()
    link.send_frame(b"y" * 20)
    assert len(sink.lost) == 1
    assert sink.lost[0].errno == errno.ECONNREFUSED


def test_stream_sockets_are_refused_for_frame_links():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ValueError, match="SOCK_DGRAM or SOCK_SEQPACKET"):
        SocketFrameLink(a)


def refusing(link, refuse):
    """Make the link's writes fail with ENOBUFS while ``refuse(frame)`` says so."""
    write = link._write

    def _write(frame):
        if refuse(frame):
            raise OSError(errno.ENOBUFS, "No buffer space available")
        write(frame)

    link._write = _write


def test_no_buffer_space_is_retried_on_a_timer_without_spinning():
    link, peer, sink, reactor = make()
    refusals = iter(range(3))
    refusing(link, lambda frame: next(refusals, None) is not None)
    link.send_frame(b"first")
    link.send_frame(b"second")
    # The fd polls writable throughout; waiting for that would be a busy loop.
    assert link not in reactor.writers and link.queued_frames == 2
    waited = 0.0
    while link.queued_frames and waited < 0.1:
        reactor.advance(0.001)
        waited += 0.001
    peer.setblocking(False)
    assert [peer.recv(100), peer.recv(100)] == [b"first", b"second"]
    assert not link.drops and not sink.lost and link not in reactor.writers
    assert 0.002 < waited < 0.05  # three refusals: 1 + 1 + 2 ms of backoff


def test_a_frame_refused_for_too_long_is_dropped_and_the_rest_go_through():
    link, peer, sink, reactor = make()
    refusing(link, lambda frame: frame == b"never")
    link.send_frame(b"never")
    link.send_frame(b"after")
    for _ in range(400):
        reactor.advance(0.001)
    peer.setblocking(False)
    assert peer.recv(100) == b"after"
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    assert link.drops["no-buffer-space"] == 1
    assert not sink.lost and link.queued_frames == 0 and not reactor.getDelayedCalls()
    link.send_frame(b"later")  # the link is still up
    assert peer.recv(100) == b"later"


def test_a_frame_too_long_for_the_socket_is_dropped_not_the_link():
    link, peer, sink, reactor = make()
    link._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link.send_frame(b"x" * 60000)  # the kernel answers EMSGSIZE
    link.send_frame(b"small")
    assert peer.recv(100) == b"small"
    assert link.drops["message-too-long"] == 1 and not sink.lost
