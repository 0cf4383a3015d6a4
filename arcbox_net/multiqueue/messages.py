"""The pipe between the main process and a queue worker: length-prefixed messages.

Each message is a 4-byte big-endian length, a type byte and a payload; the
length counts the type byte. ``MessageReader`` cuts a byte stream however it
arrives and refuses a length outside 1..MAX_MESSAGE.
"""

import struct

_LENGTH = struct.Struct("!I")

#: Worker -> main message types.
READY, RELAY, CAPTURED, EVENT, SNAPSHOT, LOG = b"Y", b"F", b"C", b"E", b"S", b"L"
#: Main -> worker: the options (events, capture) as JSON.
OPTIONS = b"O"

#: Longest message (a snapshot of thousands of connections is a few MB).
MAX_MESSAGE = 64 << 20
#: Seconds between a worker's snapshots (only sent when something moved).
SNAPSHOT_INTERVAL = 1.0
#: Seconds a stopping worker gets before SIGKILL.
STOP_GRACE = 3.0


def encode(kind, payload=b""):
    return _LENGTH.pack(len(payload) + 1) + kind + payload


class MessageReader:
    """Cuts a byte stream into (kind, payload) messages."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data):
        buf = self._buffer
        buf += data
        messages = []
        start = 0
        while len(buf) - start >= 4:
            (length,) = _LENGTH.unpack_from(buf, start)
            if not 1 <= length <= MAX_MESSAGE:
                raise ValueError(f"bad message length {length}")
            end = start + 4 + length
            if end > len(buf):
                break
            messages.append((bytes(buf[start + 4:start + 5]), bytes(buf[start + 5:end])))
            start = end
        del buf[:start]
        return messages
