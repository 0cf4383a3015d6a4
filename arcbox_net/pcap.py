"""Packet capture: every frame the guest link carries, both ways, to a pcap file.

The dispatcher calls ``capture.write(frame)`` for each frame read from the
guest and each frame sent to it. The file is classic pcap (Ethernet link
type, snaplen 65535, microsecond timestamps; the file header from
dpkt.pcap.Writer, each record packed here) and flushed
after every frame so that ``tshark -r`` or ``tcpdump -r`` can read it while
the stack runs. Frames longer than the snaplen (only possible with an MTU
above 65517) are truncated with their original length recorded, as tcpdump
does. A write error (disk full) stops the capture with a log line; it never
disturbs the datapath.
"""

import os
import struct
import time

import dpkt
from twisted.logger import Logger

SNAPLEN = 65535
#: A record header: seconds, microseconds, captured length, original length,
#: in the byte order dpkt.pcap.Writer wrote the file header in (native).
_RECORD = struct.Struct("=IIII")


class PcapCapture:
    log = Logger()

    def __init__(self, path, snaplen=SNAPLEN, clock=time.time_ns):
        self.path = os.fspath(path)
        self.snaplen = snaplen
        self._clock = clock
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb")
        try:
            self._writer = dpkt.pcap.Writer(self._file, snaplen=snaplen,
                                            linktype=dpkt.pcap.DLT_EN10MB)
            self._file.flush()
        except OSError:
            try:
                self._file.close()
            except OSError:
                pass
            raise
        self.frames = 0
        self.bytes = 0

    @property
    def active(self):
        return self._file is not None

    def write(self, frame):
        """Record one frame: bytes, or a sequence of buffers (gathered)."""
        f = self._file
        if f is None:
            return
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            frame = b"".join(frame)
        length = len(frame)
        # Whole microseconds from an integer clock: the fraction never rounds to 1 s.
        sec, usec = divmod(self._clock() // 1000, 1_000_000)
        caplen = min(length, self.snaplen)
        try:
            f.write(_RECORD.pack(sec, usec, caplen, length))
            f.write(frame if caplen == length else frame[:caplen])
            f.flush()
        except (OSError, ValueError) as e:
            self.log.error("stopping the capture to {path}: {error}", path=self.path, error=e)
            self.close()
            return
        self.frames += 1
        self.bytes += length

    def close(self):
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def stats(self):
        return {"path": self.path, "frames": self.frames, "bytes": self.bytes,
                "active": self.active}
