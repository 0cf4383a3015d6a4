"""--pcap / NetworkStack.start_capture: frames both ways in a pcap file that
dpkt and tshark read back (tshark without a single warning)."""


import os
import stat

import dpkt
import framebuild as fb
import pytest
from twisted.internet.testing import MemoryReactorClock

from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.pcap import PcapCapture
from arcbox_net.stack import NetworkStack


class FakeLink:
    description = "fake"
    mtu = 1500

    def __init__(self):
        self.frames = []

    def start(self, sink):
        pass

    def stop(self):
        pass

    def send_frame(self, frame):
        self.frames.append(b"".join(frame) if isinstance(frame, list) else bytes(frame))


def read_pcap(path):
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB
        assert reader.snaplen == 65535
        return [bytes(buf) for _, buf in reader]


def test_capture_writes_frames_readable_while_open(tmp_path):
    path = tmp_path / "c.pcap"
    cap = PcapCapture(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cap.write(fb.arp_request())
    cap.write([b"\x02" * 14, memoryview(b"gathered"), bytearray(b"!")])
    assert read_pcap(path) == [fb.arp_request(), b"\x02" * 14 + b"gathered!"]  # flushed
    cap.close()
    cap.write(b"after close is ignored")
    assert cap.stats() == {"path": str(path), "frames": 2, "bytes": 42 + 23, "active": False,
                           "dropped": 0, "buffered": 0}


def test_frames_longer_than_the_snaplen_are_truncated_with_their_length(tmp_path):
    path = tmp_path / "c.pcap"
    cap = PcapCapture(path, snaplen=100)
    cap.write(b"\x01" * 300)
    cap.close()
    with open(path, "rb") as f:
        data = f.read()
    hdr = dpkt.pcap.LEPktHdr(data[24:40]) if data[:4] == b"\xd4\xc3\xb2\xa1" \
        else dpkt.pcap.PktHdr(data[24:40])
    assert (hdr.caplen, hdr.len) == (100, 300)
    assert len(data) == 24 + 16 + 100


def test_write_error_stops_the_capture_not_the_datapath(tmp_path):
    cap = PcapCapture(tmp_path / "c.pcap")

    def full(fd, data):
        raise OSError(28, "No space left on device")

    cap._os_write = full
    cap.write(fb.arp_request())  # logged, capture closed, nothing raised
    assert not cap.active
    cap.write(fb.arp_request())


def test_capture_that_cannot_start_raises(tmp_path):
    with pytest.raises(OSError):
        PcapCapture(tmp_path / "no" / "such" / "dir.pcap")
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError):
            PcapCapture("/dev/full")  # the header's flush fails at once


def test_dispatcher_captures_both_directions():
    link = FakeLink()
    dispatcher = FrameDispatcher(StackConfig(), link)
    seen = []

    class Capture:
        def write(self, frame):
            seen.append(b"".join(frame) if isinstance(frame, list) else bytes(frame))

    dispatcher.capture = Capture()
    dispatcher.frames_received([b"short"])
    dispatcher.framer.send_frame([b"a" * 14, b"b"])
    assert seen == [b"short", b"a" * 14 + b"b"]


def test_network_stack_start_and_stop_capture(tmp_path):
    link = FakeLink()
    stack = NetworkStack(link, StackConfig(dns_upstreams=["127.0.0.1:9"]),
                         reactor=MemoryReactorClock())
    path = tmp_path / "stack.pcap"
    stack.start_capture(path)
    with pytest.raises(RuntimeError, match="already running"):
        stack.start_capture(tmp_path / "second.pcap")
    stack.dispatcher.frames_received([fb.arp_request()])
    assert len(link.frames) == 1  # the ARP reply
    assert stack.stop_capture()["frames"] == 2
    assert stack.stop_capture() is None
    frames = read_pcap(path)
    assert frames == [fb.arp_request(), link.frames[0]]
    stack.dispatcher.frames_received([fb.arp_request()])  # not captured any more
    assert len(read_pcap(path)) == 2
    stack.start_capture(tmp_path / "again.pcap")  # a new capture after a stop
    stack.dispatcher.frames_received([fb.arp_request()])
    stack.stop_capture()
    assert len(read_pcap(tmp_path / "again.pcap")) == 2


def test_a_slow_fifo_reader_gets_frames_dropped_never_the_writer_blocked(tmp_path):
    """Nobody reads the FIFO: every write returns at once, the buffer stays
    bounded, the excess frames are counted, and what was kept is valid pcap."""
    fifo = tmp_path / "slow.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        cap = PcapCapture(fifo, max_buffer=256 * 1024)
        frame = fb.udp(4000, 53, b"z" * 1400)
        for _ in range(2000):                     # ~2.9 MB, the pipe holds 64 KiB
            cap.write(frame)
        stats = cap.stats()
        assert stats["active"] and stats["dropped"] > 0
        assert stats["frames"] + stats["dropped"] == 2000
        assert cap.buffered <= 256 * 1024
        # The reader catches up: every kept record arrives whole.
        data = bytearray()
        while True:
            try:
                chunk = os.read(reader, 1 << 20)
            except BlockingIOError:
                chunk = b""
            if not chunk:
                if not cap.buffered:
                    break
                cap.write(frame)                  # a new frame flushes what waits
                continue
            data += chunk
        cap.close()
        import io
        records = [bytes(b) for _, b in dpkt.pcap.Reader(io.BytesIO(bytes(data)))]
        assert records and all(r == frame for r in records)
        assert len(records) == cap.frames
    finally:
        os.close(reader)


def test_a_fifo_without_a_reader_is_refused_at_once(tmp_path):
    fifo = tmp_path / "nobody.fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        PcapCapture(fifo)


def test_exclusive_capture_never_truncates_nor_follows_a_symlink(tmp_path):
    existing = tmp_path / "keep.txt"
    existing.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        PcapCapture(existing, exclusive=True)
    link = tmp_path / "link.pcap"
    link.symlink_to(tmp_path / "target.pcap")
    with pytest.raises(OSError):
        PcapCapture(link, exclusive=True)
    assert existing.read_bytes() == b"precious"
    assert not (tmp_path / "target.pcap").exists()
    cap = PcapCapture(tmp_path / "new.pcap", exclusive=True)
    cap.close()
    assert read_pcap(tmp_path / "new.pcap") == []
