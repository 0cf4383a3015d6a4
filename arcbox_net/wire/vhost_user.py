"""vhost-user messages (QEMU's docs/interop/vhost-user.rst), sans-I/O.

A front-end (QEMU) talks to the back-end (us) over a unix stream socket:
a 12-byte header (request, flags, payload size; little-endian u32s), the
payload, and file descriptors (guest memory, eventfds) as SCM_RIGHTS beside
the first byte of the message. ``MessageReader`` turns bytes and fds as
they arrive into ``Message`` values and checks, before any payload is
looked at, that the size is the one the request has and that the message
brought exactly the fds it must: a front-end that breaks either is broken,
and ``ProtocolError`` says how. The payload parsers below assume a checked
message.
"""

import struct

import attrs

HEADER = struct.Struct("<III")
HEADER_LEN = HEADER.size
U64 = struct.Struct("<Q")
#: struct vhost_vring_state: index, num.
VRING_STATE = struct.Struct("<II")
#: struct vhost_vring_addr: index, flags, desc, used, avail, log (user addresses).
VRING_ADDR = struct.Struct("<IIQQQQ")
#: nregions, padding; then that many regions.
MEMORY_HEAD = struct.Struct("<II")
#: guest_phys_addr, memory_size, userspace_addr, mmap_offset.
MEMORY_REGION = struct.Struct("<QQQQ")
#: Regions one SET_MEM_TABLE carries at most (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_REGIONS = 8
#: The largest payload any request we take has (SET_MEM_TABLE with 8 regions).
MAX_PAYLOAD = MEMORY_HEAD.size + MAX_REGIONS * MEMORY_REGION.size

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# Requests, front-end to back-end.
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SEND_RARP = 19
NET_SET_MTU = 20

NAMES = {value: name for name, value in (
    ("GET_FEATURES", 1), ("SET_FEATURES", 2), ("SET_OWNER", 3), ("RESET_OWNER", 4),
    ("SET_MEM_TABLE", 5), ("SET_LOG_BASE", 6), ("SET_LOG_FD", 7), ("SET_VRING_NUM", 8),
    ("SET_VRING_ADDR", 9), ("SET_VRING_BASE", 10), ("GET_VRING_BASE", 11),
    ("SET_VRING_KICK", 12), ("SET_VRING_CALL", 13), ("SET_VRING_ERR", 14),
    ("GET_PROTOCOL_FEATURES", 15), ("SET_PROTOCOL_FEATURES", 16), ("GET_QUEUE_NUM", 17),
    ("SET_VRING_ENABLE", 18), ("SEND_RARP", 19), ("NET_SET_MTU", 20))}

#: The payload size of each request we implement.
PAYLOAD_SIZE = {
    GET_FEATURES: 0, SET_FEATURES: 8, SET_OWNER: 0, RESET_OWNER: 0,
    SET_VRING_NUM: 8, SET_VRING_ADDR: VRING_ADDR.size, SET_VRING_BASE: 8,
    GET_VRING_BASE: 8, SET_VRING_KICK: 8, SET_VRING_CALL: 8, SET_VRING_ERR: 8,
    GET_PROTOCOL_FEATURES: 0, SET_PROTOCOL_FEATURES: 8, GET_QUEUE_NUM: 0,
    SET_VRING_ENABLE: 8,
}
#: Requests that are about logging dirty pages, i.e. live migration: refused.
MIGRATION = {SET_LOG_BASE: "SET_LOG_BASE", SET_LOG_FD: "SET_LOG_FD"}
#: Requests whose reply is their own answer (not a REPLY_ACK).
HAS_REPLY = {GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_VRING_BASE}

#: The u64 of SET_VRING_KICK/CALL/ERR: ring index, and "no fd comes with it".
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100

# Protocol features (GET/SET_PROTOCOL_FEATURES bits).
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_RARP = 2
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_MTU = 4

#: Feature bit 30: the back-end speaks GET/SET_PROTOCOL_FEATURES.
F_PROTOCOL_FEATURES = 30
#: Feature bit 26: dirty-page logging (migration); never offered.
F_LOG_ALL = 26


class ProtocolError(Exception):
    """The front-end sent something the protocol does not allow."""


@attrs.frozen
class Message:
    request: int
    flags: int
    payload: bytes
    fds: tuple = ()

    @property
    def name(self):
        return NAMES.get(self.request, f"request {self.request}")

    @property
    def need_reply(self):
        return bool(self.flags & FLAG_NEED_REPLY)


@attrs.frozen
class MemoryRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


def fds_expected(request, payload):
    """How many fds a checked message of ``request`` must bring."""
    if request == SET_MEM_TABLE:
        return MEMORY_HEAD.unpack_from(payload)[0]
    if request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
        return 0 if U64.unpack(payload)[0] & VRING_NOFD else 1
    return 0


def check(request, flags, payload, nfds):
    """Raise ProtocolError unless a message is well-formed for its request.

    Unknown requests pass (the device decides what to do with them) as long
    as they bring no fds; known ones must have their exact size and fds.
    """
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"message version {flags & FLAG_VERSION_MASK}, not {VERSION}")
    if flags & FLAG_REPLY:
        raise ProtocolError("a reply flag on a request")
    name = NAMES.get(request, f"request {request}")
    if request == SET_MEM_TABLE:
        if len(payload) < MEMORY_HEAD.size:
            raise ProtocolError(f"SET_MEM_TABLE of {len(payload)} bytes")
        n = MEMORY_HEAD.unpack_from(payload)[0]
        if not 1 <= n <= MAX_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE with {n} regions (1..{MAX_REGIONS})")
        want = MEMORY_HEAD.size + n * MEMORY_REGION.size
        if len(payload) != want:
            raise ProtocolError(f"SET_MEM_TABLE of {n} regions in {len(payload)} bytes, "
                                f"not {want}")
    elif request in PAYLOAD_SIZE:
        if len(payload) != PAYLOAD_SIZE[request]:
            raise ProtocolError(f"{name} of {len(payload)} bytes, not {PAYLOAD_SIZE[request]}")
    elif nfds and request not in MIGRATION:
        raise ProtocolError(f"{name} (not implemented) came with {nfds} fds")
    else:
        return  # refused by the device, which closes its fds
    want_fds = fds_expected(request, payload)
    if nfds != want_fds:
        raise ProtocolError(f"{name} came with {nfds} fds, not {want_fds}")


class MessageReader:
    """Messages out of a byte stream with fds beside it, fed as they arrive.

    Which message do fds belong to? A front-end sends each message in one
    sendmsg, its fds with it; a read may return several messages, and the
    kernel ends a read with the first chunk that carries fds. So the fds of a
    read belong to the last message that starts in it (or, if none starts
    there, to the one the read continues). A message that completes without
    the fds it needs, or with fds it must not have, is an error. Callers
    close the fds of a message, and ``pending_fds`` when they give up.
    """

    def __init__(self):
        self._buf = bytearray()
        #: Offsets (into the buffer) of message starts -> the fds sent with them.
        self._fds = {}

    @property
    def pending_fds(self):
        return [fd for fds in self._fds.values() for fd in fds]

    def clear(self):
        self._fds = {}
        self._buf = bytearray()

    def _starts(self, upto):
        """Message starts in the buffer below ``upto``."""
        starts = []
        pos = 0
        buf = self._buf
        while pos < upto:
            starts.append(pos)
            if len(buf) - pos < HEADER_LEN:
                break
            pos += HEADER_LEN + HEADER.unpack_from(buf, pos)[2]
        return starts

    def feed(self, data, fds=()):
        """The messages ``data`` (and ``fds``) complete; ProtocolError on a bad one."""
        chunk_start = len(self._buf)
        self._buf += data
        if fds:
            starts = self._starts(len(self._buf))
            inside = [p for p in starts if p >= chunk_start]
            owner = inside[-1] if inside else (starts[-1] if starts else 0)
            self._fds.setdefault(owner, []).extend(fds)
        out = []
        buf = self._buf
        while len(buf) >= HEADER_LEN:
            request, flags, size = HEADER.unpack_from(buf)
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"{NAMES.get(request, request)}: payload of {size} bytes "
                                    f"(at most {MAX_PAYLOAD})")
            if len(buf) < HEADER_LEN + size:
                break
            payload = bytes(buf[HEADER_LEN:HEADER_LEN + size])
            check(request, flags, payload, len(self._fds.get(0, ())))
            fds = tuple(self._fds.pop(0, ()))
            end = HEADER_LEN + size
            del buf[:end]
            self._fds = {pos - end: f for pos, f in self._fds.items()}
            out.append(Message(request, flags, payload, fds))
        return out


def encode(request, payload=b"", flags=VERSION):
    """A message as bytes (requests, for tests; replies via ``reply``)."""
    return HEADER.pack(request, flags, len(payload)) + payload


def reply(request, payload=b""):
    return encode(request, payload, VERSION | FLAG_REPLY)


def reply_u64(request, value):
    return reply(request, U64.pack(value))


def u64(payload):
    return U64.unpack(payload)[0]


def vring_state(payload):
    """(index, num) of SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE."""
    return VRING_STATE.unpack(payload)


def vring_addr(payload):
    """(index, flags, desc, used, avail, log) of SET_VRING_ADDR."""
    return VRING_ADDR.unpack(payload)


def memory_regions(payload):
    n = MEMORY_HEAD.unpack_from(payload)[0]
    return [MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEAD.size
                                                    + i * MEMORY_REGION.size))
            for i in range(n)]


def memory_table(regions):
    """The SET_MEM_TABLE payload of ``regions`` (for tests)."""
    return MEMORY_HEAD.pack(len(regions), 0) + b"".join(
        MEMORY_REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset) for r in regions)
