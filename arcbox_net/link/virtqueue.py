"""Split virtqueues (virtio 1.x, section 2.7) over a map of guest memory, sans-I/O.

The driver (the guest) and the device (us) share three rings in guest
memory: the descriptor table (addr, len, flags, next), the available ring
(the driver's heads, ``avail.idx`` free-running) and the used ring (our
answers, ``used.idx``). Everything in them is written by the guest and
may be hostile, so every value read is checked before it is used:

- a descriptor must lie inside one region of guest memory (``GuestMemory``
  raises otherwise), a head or ``next`` must be an index of the table, a
  chain may not be longer than the table (a loop), and no indirect
  descriptors (never negotiated);
- ``avail.idx`` may be ahead of what we consumed by at most the ring size.

Any of these raises ``VirtqueueError``: the device is broken and the caller
closes it. Nothing here touches an fd; the test suite plays the driver over
a buffer it owns.
"""

import struct

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
#: The largest ring the spec allows.
MAX_QUEUE_SIZE = 32768


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules; the device cannot go on."""


class GuestMemory:
    """Guest memory regions mapped into our address space.

    Each region is ``(guest_addr, size, user_addr, buffer)``: the guest
    physical address descriptors use, the front-end's (QEMU's) virtual
    address the ring addresses use, and a writable buffer of ``size`` bytes
    (a slice of an mmap, or a bytearray in tests).
    """

    def __init__(self, regions):
        self._regions = []
        for guest_addr, size, user_addr, buffer in regions:
            view = memoryview(buffer).cast("B")
            if size <= 0 or len(view) < size:
                raise VirtqueueError(f"region of {size} bytes at {guest_addr:#x} is not mapped")
            if guest_addr + size > 1 << 64 or user_addr + size > 1 << 64:
                raise VirtqueueError(f"region at {guest_addr:#x} wraps the address space")
            self._regions.append((guest_addr, guest_addr + size, user_addr,
                                  user_addr + size, view[:size]))
        # (start, stop, view) by guest address, the last hit first: a guest's
        # buffers mostly sit in one region.
        self._guest = [(r[0], r[1], r[4]) for r in self._regions]

    def guest(self, addr, length):
        """A view of ``length`` bytes at guest physical ``addr`` (descriptors)."""
        end = addr + length
        table = self._guest
        for i, (start, stop, view) in enumerate(table):
            if start <= addr and end <= stop:
                if i:
                    table.insert(0, table.pop(i))
                return view[addr - start:end - start]
        raise VirtqueueError(f"{length} bytes at guest address {addr:#x} are outside "
                             "every memory region")

    def user(self, addr, length):
        """A view of ``length`` bytes at front-end virtual ``addr`` (rings)."""
        for _, _, start, stop, view in self._regions:
            if start <= addr and addr + length <= stop:
                return view[addr - start:addr - start + length]
        raise VirtqueueError(f"{length} bytes at front-end address {addr:#x} are outside "
                             "every memory region")

    def release(self):
        """Drop every view, so the mappings under them can be closed."""
        for region in self._regions:
            region[4].release()
        self._regions = []
        self._guest = []


class Chain:
    """One descriptor chain: its head, readable then writable buffers."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head, readable, writable, readable_len, writable_len):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len


class Virtqueue:
    """One split virtqueue, the device's side.

    ``pop()`` takes the next available chain (None when there is none),
    ``push(chain, written)`` returns it through the used ring, ``rewind(n)``
    gives back chains popped but not used (an RX frame that did not fit),
    ``needs_notify()`` says whether the driver wants an interrupt.
    """

    def __init__(self, memory, num, desc_addr, avail_addr, used_addr, last_avail=0):
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtqueueError(f"queue size {num} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise VirtqueueError("misaligned ring addresses")
        self.memory = memory
        self.num = num
        self.desc = memory.user(desc_addr, 16 * num)
        self.avail = memory.user(avail_addr, 4 + 2 * num)
        self.used = memory.user(used_addr, 4 + 8 * num)
        self.last_avail = last_avail & 0xFFFF
        #: RX chains taken from the ring but not used yet (``put_frame``).
        self.reserved = []
        self.reserved_room = 0
        #: Continue where the used ring is (a front-end may hand us a used ring
        #: with entries in it, e.g. after a reconnect).
        self.used_idx = U16.unpack_from(self.used, 2)[0]

    def pending(self):
        """Chains the driver made available that we have not taken."""
        n = (U16.unpack_from(self.avail, 2)[0] - self.last_avail) & 0xFFFF
        if n > self.num:
            raise VirtqueueError(f"available index ran {n} ahead on a ring of {self.num}")
        return n

    def pop(self):
        last = self.last_avail
        n = (U16.unpack_from(self.avail, 2)[0] - last) & 0xFFFF
        if not n:
            return None
        num = self.num
        if n > num:
            raise VirtqueueError(f"available index ran {n} ahead on a ring of {num}")
        head = U16.unpack_from(self.avail, 4 + 2 * (last % num))[0]
        if head >= num:
            raise VirtqueueError(f"available head {head} is not below the ring size {num}")
        addr, length, flags, nxt = DESC.unpack_from(self.desc, 16 * head)
        if not flags & (DESC_F_NEXT | DESC_F_INDIRECT):  # one descriptor: the common case
            buf = self.memory.guest(addr, length)
            chain = (Chain(head, (), [buf], 0, length) if flags & DESC_F_WRITE
                     else Chain(head, [buf], (), length, 0))
        else:
            chain = self._chain(head)
        self.last_avail = (last + 1) & 0xFFFF
        return chain

    def rewind(self, count):
        self.last_avail = (self.last_avail - count) & 0xFFFF

    def _chain(self, head):
        num = self.num
        readable, writable = [], []
        rlen = wlen = 0
        desc, guest = self.desc, self.memory.guest
        index = head
        for _ in range(num):
            addr, length, flags, nxt = DESC.unpack_from(desc, 16 * index)
            if flags & DESC_F_INDIRECT:
                raise VirtqueueError("an indirect descriptor (not negotiated)")
            buf = guest(addr, length)
            if flags & DESC_F_WRITE:
                writable.append(buf)
                wlen += length
            elif writable:
                raise VirtqueueError("a readable descriptor after a writable one")
            else:
                readable.append(buf)
                rlen += length
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable, rlen, wlen)
            if nxt >= num:
                raise VirtqueueError(f"descriptor {index} chains to {nxt}, past the "
                                     f"ring size {num}")
            index = nxt
        raise VirtqueueError(f"descriptor chain from {head} is longer than the ring (a loop)")

    def push(self, chain, written):
        """Return ``chain`` to the driver, ``written`` bytes of it filled."""
        slot = 4 + 8 * (self.used_idx % self.num)
        USED_ELEM.pack_into(self.used, slot, chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(self.used, 2, self.used_idx)

    def push_many(self, entries):
        """Return several chains, ``(head, written)`` each; used.idx moves once,
        after all of them are in the ring."""
        used, num, idx = self.used, self.num, self.used_idx
        for head, written in entries:
            USED_ELEM.pack_into(used, 4 + 8 * (idx % num), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        U16.pack_into(used, 2, idx)

    @property
    def next_avail(self):
        """Where the driver should resume: chains reserved but unused are not consumed."""
        return (self.last_avail - len(self.reserved)) & 0xFFFF

    def set_no_notify(self, value):
        """Ask the driver not to kick (True) or to kick again (False)."""
        U16.pack_into(self.used, 0, VRING_USED_F_NO_NOTIFY if value else 0)

    def needs_notify(self):
        return not U16.unpack_from(self.avail, 0)[0] & AVAIL_F_NO_INTERRUPT

    def release(self):
        self.reserved = []
        for view in (self.desc, self.avail, self.used):
            view.release()


def copy_into(buffers, parts):
    """Gather ``parts`` (buffers) into ``buffers`` (writable views) in order;
    the bytes written. The caller made sure they fit."""
    bufs = iter(buffers)
    dst = next(bufs, None)
    pos = 0
    total = 0
    for part in parts:
        src = memoryview(part).cast("B") if not isinstance(part, bytes) else part
        offset = 0
        left = len(src)
        while left:
            room = len(dst) - pos
            if not room:
                dst = next(bufs)
                pos = 0
                continue
            n = min(room, left)
            dst[pos:pos + n] = src[offset:offset + n]
            pos += n
            offset += n
            left -= n
            total += n
    return total


class FrameTooBig(Exception):
    """A frame that no set of the driver's buffers can hold (dropped, counted)."""


def put_frame(vq, header, parts, length, mergeable):
    """Write a virtio-net header and a frame into the RX queue ``vq``.

    ``header`` is the virtio_net_hdr (12 bytes: its num_buffers is filled in
    here), ``parts`` the frame's buffers, ``length`` their total. With
    MRG_RXBUF the frame may span several chains; without, it must fit one.
    Returns False when the driver has not posted enough buffers yet: the
    chains taken so far stay in ``vq.reserved`` for the next try, so a
    64 KiB frame waiting for 40 small buffers walks each chain once, not once
    per kick. Raises FrameTooBig when a frame can never fit: one buffer
    without MRG_RXBUF, the whole ring with it.
    """
    need = len(header) + length
    chains = vq.reserved
    room = vq.reserved_room
    while room < need and (mergeable or not chains):
        if len(chains) >= vq.num:
            break  # the whole ring cannot hold it: it never will
        chain = vq.pop()
        if chain is None:
            vq.reserved_room = room
            return False
        if chain.readable:
            raise VirtqueueError("a receive buffer with readable descriptors")
        chains.append(chain)
        room += chain.writable_len
    if room < need:
        vq.reserved_room = room
        raise FrameTooBig(f"a {need}-byte frame and a {room}-byte receive buffer")
    # The chains this frame needs; any beyond (reserved for a bigger frame
    # that was dropped since) stay reserved.
    used, got = 0, 0
    while got < need:
        got += chains[used].writable_len
        used += 1
    mine = chains[:used]
    del chains[:used]
    vq.reserved_room = room - got
    if len(header) >= 12:
        header = bytes(header[:10]) + U16.pack(len(mine)) + bytes(header[12:])
    copy_into([b for c in mine for b in c.writable], [header, *parts])
    used = []
    for chain in mine:
        n = min(chain.writable_len, need)
        used.append((chain.head, n))
        need -= n
    vq.push_many(used)
    return True


def take_frame(vq, header_len, limit):
    """The next frame the driver sent on the TX queue ``vq``.

    Returns None when none is waiting, else ``(header, frame)``: header the
    first ``header_len`` bytes, frame a bytes copy of the rest (the one copy:
    guest memory is reused once the chain is returned). A chain shorter than
    the header, or longer than ``header_len + limit``, gives ``(None, reason)``.
    The chain is returned to the driver either way.
    """
    chain = vq.pop()
    if chain is None:
        return None
    try:
        if chain.writable:
            raise VirtqueueError("a transmit buffer with writable descriptors")
        total = chain.readable_len
        if total < header_len:
            return None, "short-vnet-frame"
        if total > header_len + limit:
            return None, "oversize-frame"
        header = bytearray()
        body = []
        for buf in chain.readable:
            if len(header) < header_len:
                take = min(header_len - len(header), len(buf))
                header += buf[:take]
                buf = buf[take:]
            if len(buf):
                body.append(buf)
        frame = bytes(body[0]) if len(body) == 1 else b"".join(body)
        return bytes(header), frame
    finally:
        vq.push(chain, 0)
