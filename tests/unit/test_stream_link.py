"""Unix-socket links: stream framing (sans-I/O), stream and dgram links over real
sockets driven without a running reactor, and socket-file handling."""


import struct

import pytest

from arcbox_net.link.stream import (
    MAX_FRAME,
    FramingError,
    StreamDecoder,
    WriteQueue,
    encode,
)


def frame(n, size=60):
    """A recognisable frame: ``n`` repeated, at least an Ethernet header long."""
    return (n.to_bytes(2, "big") * (size // 2 + 1))[:size]


def test_frames_split_at_every_byte_boundary():
    frames = [frame(1, 14), frame(2, 60), frame(3, 1514), frame(4, 61)]
    data = b"".join(encode(f) for f in frames)
    for cut in range(len(data) + 1):
        d = StreamDecoder()
        got = d.feed(data[:cut]) + d.feed(data[cut:])
        assert got == frames, cut
        assert d.buffered == 0 and d.error is None


def test_frames_fed_one_byte_at_a_time():
    frames = [frame(i, 14 + i * 7) for i in range(20)]
    data = b"".join(encode(f) for f in frames)
    d = StreamDecoder()
    got = []
    for i in range(len(data)):
        got += d.feed(data[i:i + 1])
        assert d.buffered <= 4 + max(len(f) for f in frames)
    assert got == frames


def test_frames_split_at_every_pair_of_cuts():
    frames = [frame(7, 20), frame(8, 30)]
    data = b"".join(encode(f) for f in frames)
    for a in range(len(data) + 1):
        for b in range(a, len(data) + 1):
            d = StreamDecoder()
            assert d.feed(data[:a]) + d.feed(data[a:b]) + d.feed(data[b:]) == frames


def test_many_frames_in_one_read():
    frames = [frame(i, 60 + i % 1500) for i in range(2000)]
    d = StreamDecoder()
    assert d.feed(b"".join(encode(f) for f in frames)) == frames
    assert d.buffered == 0


def test_gathered_and_memoryview_input():
    d = StreamDecoder()
    data = encode([b"head" * 4, memoryview(b"-payload")])
    assert d.feed(memoryview(data)) == [b"head" * 4 + b"-payload"]
    assert d.feed(bytearray(encode(frame(5)))) == [frame(5)]


@pytest.mark.parametrize("length, message", [
    (0, "zero-length frame"),
    (13, "shorter than an Ethernet header"),
    (MAX_FRAME + 1, "exceeds"),
    (0xFFFFFFFF, "exceeds"),
    (0x47455420, "exceeds"),  # "GET " : someone speaking HTTP to the socket
])
def test_bad_prefix_is_an_error_after_the_good_frames(length, message):
    d = StreamDecoder()
    good = frame(9)
    got = d.feed(encode(good) + struct.pack(">I", length) + b"x" * 100)
    assert got == [good]
    assert isinstance(d.error, FramingError) and message in str(d.error)
    assert d.buffered == 0  # nothing kept (and nothing allocated for the claimed length)
    with pytest.raises(FramingError):
        d.feed(encode(good))


def test_bad_prefix_split_across_reads():
    d = StreamDecoder()
    assert d.feed(b"\x00\x00") == []
    assert d.error is None
    assert d.feed(b"\x00\x00" + b"junk") == []
    assert "zero-length" in str(d.error)


def test_largest_allowed_frame_and_bounded_buffer():
    d = StreamDecoder()
    big = b"\xab" * MAX_FRAME
    data = encode(big)
    assert d.feed(data[:1000]) == []
    assert d.buffered == 1000
    assert d.feed(data[1000:]) == [big]


class ShortWriter:
    """A sendmsg stand-in that takes at most ``step`` bytes, refusing every other call."""

    def __init__(self, step):
        self.step = step
        self.out = bytearray()
        self.calls = 0

    def __call__(self, bufs):
        self.calls += 1
        if self.calls % 2 == 0:
            raise BlockingIOError()
        data = b"".join(bytes(b) for b in bufs)[:self.step]
        self.out += data
        return len(data)


@pytest.mark.parametrize("step", [1, 3, 4, 5, 61, 64, 1000, 1 << 20])
def test_partial_writes_resume_and_never_drop(step):
    frames = [frame(i, 14 + (i * 37) % 300) for i in range(40)]
    frames.append([b"gathered-", memoryview(b"frame-" * 3), bytearray(b"end")])
    q = WriteQueue()
    for f in frames:
        q.push(f)
    assert q.frames == len(frames)
    w = ShortWriter(step)
    rounds = 0
    while not q.flush(w):
        rounds += 1
        assert rounds < 100000
    assert q.frames == 0 and q.bytes == 0
    d = StreamDecoder()
    assert d.feed(bytes(w.out)) == [f if isinstance(f, bytes) else b"".join(bytes(p) for p in f)
                                    for f in frames]


def test_write_queue_counts_frames_as_they_complete():
    q = WriteQueue()
    q.push(frame(1, 20))
    q.push(frame(2, 20))
    assert q.flush(lambda bufs: 10) is False  # a short write stops the flush
    assert q.frames == 2 and q.bytes == 48 - 10
    q.flush(lambda bufs: 14)
    assert q.frames == 1
    q.flush(lambda bufs: sum(len(b) for b in bufs))
    assert q.frames == 0


def test_write_queue_copies_mutable_buffers_and_skips_empty_frames():
    q = WriteQueue()
    buf = bytearray(b"a" * 20)
    q.push(buf)
    buf[:] = b"b" * 20
    assert q.push(b"") == 0 and q.push([b"", b""]) == 0
    w = ShortWriter(1 << 20)
    q.flush(w)
    assert StreamDecoder().feed(bytes(w.out)) == [b"a" * 20]
