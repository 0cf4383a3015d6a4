"""Packet capture: every frame the guest link carries, both ways, to a pcap file.

The dispatcher calls ``capture.write(frame)`` for each frame read from the
guest and each frame sent to it. The file is classic pcap (Ethernet link
type, snaplen 65535, microsecond timestamps; the file header from
dpkt.pcap.Writer, each record packed here), written straight to the fd
after every frame so that ``tshark -r`` or ``tcpdump -r`` can read it while
the stack runs. Frames longer than the snaplen (only possible with an MTU
above 65517) are truncated with their original length recorded, as tcpdump
does.

A capture never slows the datapath: the fd is non-blocking, so a slow
reader (a FIFO into ``tshark -i -``) makes records wait in a buffer of at
most ``max_buffer`` bytes, and beyond it whole frames are dropped and
counted (``dropped``), never the guest's traffic. A write error (disk full)
stops the capture with a log line. ``exclusive=True`` (the control API's
``POST /capture``) only ever creates a new file: it never truncates one and
never follows a symlink (O_CREAT|O_EXCL|O_NOFOLLOW).
"""

import errno
import io
import os
import stat
import struct
import time

import dpkt
from twisted.logger import Logger

SNAPLEN = 65535
#: A record header: seconds, microseconds, captured length, original length,
#: in the byte order dpkt.pcap.Writer wrote the file header in (native).
_RECORD = struct.Struct("=IIII")


#: Bytes of records waiting for a slow reader, at most.
MAX_BUFFER = 4 * 1024 * 1024
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class PcapCapture:
    log = Logger()
    _os_write = staticmethod(os.write)

    def __init__(self, path, snaplen=SNAPLEN, clock=time.time_ns, exclusive=False,
                 max_buffer=MAX_BUFFER):
        self.path = os.fspath(path)
        self.snaplen = snaplen
        self.max_buffer = max_buffer
        self._clock = clock
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        if exclusive:
            flags |= os.O_EXCL | os.O_NOFOLLOW
        # A FIFO without a reader is ENXIO here: refused, never waited for.
        fd = os.open(self.path, flags, 0o600)
        try:
            if not exclusive and stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 0)        # O_TRUNC, but never on a FIFO or device
            header = io.BytesIO()
            dpkt.pcap.Writer(header, snaplen=snaplen, linktype=dpkt.pcap.DLT_EN10MB)
            self._fd = fd
            self._pending = bytearray(header.getvalue())
            self._flush()
        except BaseException:
            os.close(fd)
            self._fd = None
            raise
        self.frames = 0
        self.bytes = 0
        self.dropped = 0

    @property
    def active(self):
        return self._fd is not None

    def write(self, frame):
        """Record one frame: bytes, or a sequence of buffers (gathered)."""
        if self._fd is None:
            return
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            frame = b"".join(frame)
        length = len(frame)
        caplen = min(length, self.snaplen)
        pending = self._pending
        if pending and len(pending) + 16 + caplen > self.max_buffer:
            self._try_flush()
            if self._fd is None:
                return
            if len(pending) + 16 + caplen > self.max_buffer:
                self.dropped += 1      # the reader is behind: this frame goes, not the guest
                return
        # Whole microseconds from an integer clock: the fraction never rounds to 1 s.
        sec, usec = divmod(self._clock() // 1000, 1_000_000)
        pending += _RECORD.pack(sec, usec, caplen, length)
        pending += frame if caplen == length else frame[:caplen]
        self.frames += 1
        self.bytes += length
        self._try_flush()

    def _flush(self):
        """Write what waits, as far as the fd takes it now; never blocks.
        Raises OSError for anything but a full pipe."""
        pending = self._pending
        while pending:
            try:
                n = self._os_write(self._fd, pending)
            except OSError as e:
                if e.errno in _RETRY:
                    return
                raise
            del pending[:n]

    def _try_flush(self):
        try:
            self._flush()
        except OSError as e:
            self.log.error("stopping the capture to {path}: {error}", path=self.path, error=e)
            self._pending.clear()
            self.close()

    @property
    def buffered(self):
        """Bytes of records waiting for the reader."""
        return len(self._pending)

    def close(self):
        fd = self._fd
        if fd is None:
            return
        try:
            self._flush()          # a last try; what a slow reader never took is lost
        except OSError:
            pass
        self._fd = None
        self._pending.clear()
        try:
            os.close(fd)
        except OSError:
            pass

    def stats(self):
        return {"path": self.path, "frames": self.frames, "bytes": self.bytes,
                "active": self.active, "dropped": self.dropped, "buffered": self.buffered}
