"""vhost-user: the message parser, the split virtqueue, and the device over a socketpair.

The test plays the driver (the guest) over memory it owns -- a bytearray
for the virtqueue alone, a memfd it maps itself for the device -- and the
front-end (QEMU) over a unix socket, with real eventfds and SCM_RIGHTS. A
hostile driver or front-end must only ever close its own connection.
"""

import mmap
import os
import socket
import struct

import dpkt
import pytest
from twisted.internet.testing import MemoryReactorClock

from arcbox_net.link import softoffload
from arcbox_net.link import vhost_user as link_vu
from arcbox_net.link.virtqueue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, FrameTooBig,
                                       GuestMemory, Virtqueue, VirtqueueError, put_frame,
                                       take_frame)
from arcbox_net.wire import vhost_user as vu
from arcbox_net.wire import vnet

import framebuild

DESC = struct.Struct("<QIHH")
GUEST_BASE = 0x100000  # guest physical address of the memory
USER_BASE = 0x7F0000000000  # the front-end's virtual address of it
MEM_SIZE = 1 << 20
NUM = 8
# Layout inside the memory: rings first, then buffers.
DESC_OFF, AVAIL_OFF, USED_OFF = 0x0, 0x1000, 0x2000
DATA_OFF = 0x10000


class Driver:
    """The guest's side of one split virtqueue over ``mem`` (a writable buffer).

    ``ring`` picks where this queue's rings sit (so two queues share memory).
    """

    def __init__(self, mem, num=NUM, ring=0):
        self.mem = memoryview(mem)
        self.num = num
        base = ring * 0x4000
        self.desc, self.avail, self.used = (base + DESC_OFF, base + AVAIL_OFF,
                                            base + USED_OFF)
        self.data = DATA_OFF + ring * 0x40000
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0

    def addrs(self, base):
        return base + self.desc, base + self.avail, base + self.used

    def set_desc(self, i, addr, length, flags=0, nxt=0):
        DESC.pack_into(self.mem, self.desc + 16 * i, addr, length, flags, nxt)

    def publish(self, head):
        struct.pack_into("<H", self.mem, self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value):
        struct.pack_into("<H", self.mem, self.avail + 2, value)

    def buffer(self, i, size):
        """Guest address and memory offset of buffer slot ``i``."""
        off = self.data + i * 0x2000
        assert size <= 0x2000
        return GUEST_BASE + off, off

    def post_tx(self, *parts):
        """One chain of readable descriptors, one per part; its head."""
        head = self.next_desc
        for n, part in enumerate(parts):
            i = (head + n) % self.num
            addr, off = self.buffer(i, len(part))
            self.mem[off:off + len(part)] = part
            last = n == len(parts) - 1
            self.set_desc(i, addr, len(part), 0 if last else DESC_F_NEXT,
                          0 if last else (i + 1) % self.num)
        self.next_desc = (head + len(parts)) % self.num
        self.publish(head)
        return head

    def post_rx(self, size):
        i = self.next_desc
        addr, _ = self.buffer(i, size)
        self.set_desc(i, addr, size, DESC_F_WRITE)
        self.next_desc = (i + 1) % self.num
        self.publish(i)
        return i

    def used_entries(self):
        idx = struct.unpack_from("<H", self.mem, self.used + 2)[0]
        out = []
        while self.used_seen != idx:
            out.append(struct.unpack_from("<II", self.mem,
                                          self.used + 4 + 8 * (self.used_seen % self.num)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def read_rx(self, head, length):
        _, off = self.buffer(head, length)
        return bytes(self.mem[off:off + length])


def make_queue(num=NUM):
    mem = bytearray(MEM_SIZE)
    drv = Driver(mem, num)
    memory = GuestMemory([(GUEST_BASE, MEM_SIZE, USER_BASE, mem)])
    desc, avail, used = drv.addrs(USER_BASE)
    return drv, Virtqueue(memory, num, desc, avail, used)


FRAME = bytes(range(14)) + b"payload" * 20
HEADER = vnet.build(12)


# -- the virtqueue, driven by the test


def test_a_transmitted_frame_is_gathered_from_its_chain_and_returned():
    drv, vq = make_queue()
    drv.post_tx(HEADER[:5], HEADER[5:] + FRAME[:30], FRAME[30:])
    header, frame = take_frame(vq, 12, 1514)
    assert header == HEADER and frame == FRAME
    assert drv.used_entries() == [(0, 0)]
    assert take_frame(vq, 12, 1514) is None


def test_short_and_oversize_transmit_chains_are_dropped_but_returned():
    drv, vq = make_queue()
    drv.post_tx(b"\0" * 5)
    drv.post_tx(HEADER + b"x" * 2000)
    assert take_frame(vq, 12, 1514) == (None, "short-vnet-frame")
    assert take_frame(vq, 12, 1514) == (None, "oversize-frame")
    assert len(drv.used_entries()) == 2


def test_received_frames_span_mergeable_buffers_with_num_buffers():
    drv, vq = make_queue()
    heads = [drv.post_rx(64) for _ in range(3)]
    assert put_frame(vq, HEADER, [FRAME[:50], FRAME[50:]], len(FRAME), mergeable=True)
    used = drv.used_entries()
    total = 12 + len(FRAME)
    assert [u[0] for u in used] == heads and sum(u[1] for u in used) == total
    data = b"".join(drv.read_rx(h, n) for h, n in used)
    assert struct.unpack_from("<H", data, 10)[0] == 3  # num_buffers
    assert data[:10] == HEADER[:10] and data[12:] == FRAME


def test_a_frame_waits_until_enough_receive_buffers_are_posted():
    drv, vq = make_queue()
    drv.post_rx(64)
    assert not put_frame(vq, HEADER, [FRAME], len(FRAME), mergeable=True)
    assert drv.used_entries() == []  # nothing consumed
    drv.post_rx(200)
    assert put_frame(vq, HEADER, [FRAME], len(FRAME), mergeable=True)
    assert len(drv.used_entries()) == 2


def test_without_mergeable_buffers_a_frame_must_fit_one():
    drv, vq = make_queue()
    drv.post_rx(64)
    with pytest.raises(FrameTooBig):
        put_frame(vq, HEADER, [FRAME], len(FRAME), mergeable=False)
    assert drv.used_entries() == []
    # The buffer stays for a frame that fits.
    assert put_frame(vq, HEADER, [FRAME[:40]], 40, mergeable=False)
    assert drv.used_entries() == [(0, 52)]


def test_a_frame_larger_than_the_whole_ring_is_dropped_not_waited_for():
    drv, vq = make_queue()
    for _ in range(NUM):
        drv.post_rx(16)
    with pytest.raises(FrameTooBig):
        put_frame(vq, HEADER, [FRAME], len(FRAME), mergeable=True)
    # The ring's buffers still serve frames that fit.
    assert put_frame(vq, HEADER, [FRAME[:20]], 20, mergeable=True)
    assert len(drv.used_entries()) == 2


def test_chains_taken_while_a_frame_waits_are_not_walked_again():
    drv, vq = make_queue()
    drv.post_rx(64)
    assert not put_frame(vq, HEADER, [FRAME], len(FRAME), mergeable=True)
    assert len(vq.reserved) == 1 and vq.next_avail == 0  # not consumed, for GET_VRING_BASE
    drv.set_desc(0, GUEST_BASE + MEM_SIZE, 64)  # rewriting it now changes nothing
    drv.post_rx(200)
    assert put_frame(vq, HEADER, [FRAME], len(FRAME), mergeable=True)
    assert [u[0] for u in drv.used_entries()] == [0, 1] and vq.next_avail == 2


def test_a_descriptor_outside_every_region_breaks_the_queue():
    drv, vq = make_queue()
    drv.set_desc(0, GUEST_BASE + MEM_SIZE + 4096, 100)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="outside every memory region"):
        vq.pop()


def test_a_length_past_the_region_breaks_the_queue():
    drv, vq = make_queue()
    drv.set_desc(0, GUEST_BASE + MEM_SIZE - 10, 100)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="outside every memory region"):
        vq.pop()


def test_an_address_that_wraps_breaks_the_queue():
    drv, vq = make_queue()
    drv.set_desc(0, (1 << 64) - 8, 0xFFFFFFFF)
    drv.publish(0)
    with pytest.raises(VirtqueueError):
        vq.pop()


def test_a_descriptor_chain_loop_breaks_the_queue():
    drv, vq = make_queue()
    addr, _ = drv.buffer(0, 64)
    drv.set_desc(0, addr, 64, DESC_F_NEXT, 1)
    drv.set_desc(1, addr, 64, DESC_F_NEXT, 0)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="loop"):
        vq.pop()


def test_a_next_index_past_the_table_breaks_the_queue():
    drv, vq = make_queue()
    addr, _ = drv.buffer(0, 64)
    drv.set_desc(0, addr, 64, DESC_F_NEXT, NUM)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="past the ring size"):
        vq.pop()


def test_a_head_past_the_table_breaks_the_queue():
    drv, vq = make_queue()
    drv.publish(NUM + 3)
    with pytest.raises(VirtqueueError, match="not below the ring size"):
        vq.pop()


def test_an_available_index_jump_larger_than_the_ring_breaks_the_queue():
    drv, vq = make_queue()
    drv.set_avail_idx(NUM + 1)
    with pytest.raises(VirtqueueError, match="ahead on a ring"):
        vq.pop()


def test_indirect_descriptors_and_misordered_chains_break_the_queue():
    drv, vq = make_queue()
    addr, _ = drv.buffer(0, 64)
    drv.set_desc(0, addr, 64, DESC_F_INDIRECT)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="indirect"):
        vq.pop()
    drv, vq = make_queue()
    drv.set_desc(0, addr, 64, DESC_F_WRITE | DESC_F_NEXT, 1)
    drv.set_desc(1, addr, 64, 0)
    drv.publish(0)
    with pytest.raises(VirtqueueError, match="readable descriptor after a writable"):
        vq.pop()


def test_rings_outside_memory_or_bad_sizes_are_refused():
    mem = bytearray(MEM_SIZE)
    memory = GuestMemory([(GUEST_BASE, MEM_SIZE, USER_BASE, mem)])
    with pytest.raises(VirtqueueError, match="power of 2"):
        Virtqueue(memory, 6, USER_BASE, USER_BASE + 0x1000, USER_BASE + 0x2000)
    with pytest.raises(VirtqueueError, match="outside every memory region"):
        Virtqueue(memory, 256, USER_BASE + MEM_SIZE - 16, USER_BASE, USER_BASE + 0x2000)
    with pytest.raises(VirtqueueError, match="misaligned"):
        Virtqueue(memory, 8, USER_BASE + 8, USER_BASE + 0x1000, USER_BASE + 0x2000)


# -- the message parser


def _msg(request, payload=b"", flags=vu.VERSION):
    return vu.encode(request, payload, flags)


def test_messages_split_and_joined_are_parsed():
    reader = vu.MessageReader()
    data = _msg(vu.GET_FEATURES) + _msg(vu.SET_FEATURES, struct.pack("<Q", 5))
    out = []
    for i in range(len(data)):
        out += reader.feed(data[i:i + 1])
    assert [(m.request, m.payload) for m in out] == [(vu.GET_FEATURES, b""),
                                                     (vu.SET_FEATURES, struct.pack("<Q", 5))]


def test_fds_belong_to_the_last_message_that_starts_in_their_read():
    reader = vu.MessageReader()
    data = (_msg(vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1))
            + _msg(vu.SET_VRING_KICK, struct.pack("<Q", 1)))
    out = reader.feed(data, [42])
    assert [m.fds for m in out] == [(), (42,)]


@pytest.mark.parametrize("request_, payload, fds, match", [
    (vu.SET_FEATURES, b"\0" * 4, 0, "SET_FEATURES of 4 bytes, not 8"),
    (vu.GET_FEATURES, b"\0" * 8, 0, "GET_FEATURES of 8 bytes, not 0"),
    (vu.SET_VRING_ADDR, b"\0" * 8, 0, "SET_VRING_ADDR of 8 bytes"),
    (vu.SET_VRING_KICK, struct.pack("<Q", 0), 0, "came with 0 fds, not 1"),
    (vu.SET_VRING_KICK, struct.pack("<Q", vu.VRING_NOFD), 1, "came with 1 fds, not 0"),
    (vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1), 1, "came with 1 fds, not 0"),
    (vu.SET_MEM_TABLE, vu.MEMORY_HEAD.pack(0, 0), 0, "with 0 regions"),
    (vu.SET_MEM_TABLE, vu.MEMORY_HEAD.pack(9, 0) + b"\0" * 7 * 32, 9, "with 9 regions"),
    (vu.SET_MEM_TABLE, vu.MEMORY_HEAD.pack(2, 0) + b"\0" * 32, 1, "2 regions in 40 bytes"),
    (vu.SET_MEM_TABLE, vu.memory_table([vu.MemoryRegion(0, 4096, 0, 0)]), 0,
     "came with 0 fds, not 1"),
    (99, b"", 1, "not implemented"),
])
def test_bad_messages_are_protocol_errors(request_, payload, fds, match):
    reader = vu.MessageReader()
    with pytest.raises(vu.ProtocolError, match=match):
        reader.feed(_msg(request_, payload), list(range(100, 100 + fds)))
    assert len(reader.pending_fds) == fds  # the caller closes them


def test_bad_headers_are_protocol_errors():
    with pytest.raises(vu.ProtocolError, match="payload of"):
        vu.MessageReader().feed(vu.HEADER.pack(vu.SET_MEM_TABLE, vu.VERSION, 1 << 20))
    with pytest.raises(vu.ProtocolError, match="version"):
        vu.MessageReader().feed(_msg(vu.GET_FEATURES, flags=2))
    with pytest.raises(vu.ProtocolError, match="reply flag"):
        vu.MessageReader().feed(_msg(vu.GET_FEATURES, flags=vu.VERSION | vu.FLAG_REPLY))


# -- the device, over a socketpair with a memfd and eventfds


class Sink:
    def __init__(self):
        self.frames = []
        self.lost = []

    def frames_received(self, frames):
        self.frames.extend(frames)

    def link_lost(self, reason):
        self.lost.append(reason)


class FrontEnd:
    """The test's QEMU: a connected socket, guest memory in a memfd, two rings."""

    def __init__(self, link):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(link.path)
        self.sock.settimeout(2)
        link.doRead()  # accept
        self.link = link
        self.conn = link._conn
        self.memfd = os.memfd_create("guest")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.rx = Driver(self.mem, ring=0)
        self.tx = Driver(self.mem, ring=1)
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]

    def send(self, request, payload=b"", fds=(), need_reply=False):
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        data = vu.encode(request, payload, flags)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        self.sock.sendmsg([data], anc)
        self.conn.doRead()

    def reply(self):
        head = self.sock.recv(vu.HEADER_LEN)
        request, flags, size = vu.HEADER.unpack(head)
        assert flags & vu.FLAG_REPLY
        return request, self.sock.recv(size) if size else b""

    def closed(self):
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1) == b""
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(2)

    def set_up(self, features=0):
        """Negotiate (every offered feature, unless ``features`` is None:
        keep what was set) and start both rings."""
        self.send(vu.GET_FEATURES)
        _, offered = self.reply()
        if features is not None:
            features = vu.u64(offered)
            assert features & (1 << link_vu.F_VERSION_1)
        self.send(vu.GET_PROTOCOL_FEATURES)
        self.reply()
        self.send(vu.SET_PROTOCOL_FEATURES, vu.U64.pack(1 << vu.PROTOCOL_F_REPLY_ACK))
        self.send(vu.SET_OWNER)
        if features is not None:
            self.send(vu.SET_FEATURES, vu.U64.pack(features))
        region = vu.MemoryRegion(GUEST_BASE, MEM_SIZE, USER_BASE, 0)
        self.send(vu.SET_MEM_TABLE, vu.memory_table([region]), [self.memfd], need_reply=True)
        assert self.reply() == (vu.SET_MEM_TABLE, vu.U64.pack(0))
        for i, drv in enumerate((self.rx, self.tx)):
            desc, avail, used = drv.addrs(USER_BASE)
            self.send(vu.SET_VRING_NUM, vu.VRING_STATE.pack(i, NUM))
            self.send(vu.SET_VRING_BASE, vu.VRING_STATE.pack(i, 0))
            self.send(vu.SET_VRING_ADDR, vu.VRING_ADDR.pack(i, 0, desc, used, avail, 0))
            self.send(vu.SET_VRING_KICK, vu.U64.pack(i), [self.kicks[i]])
            self.send(vu.SET_VRING_CALL, vu.U64.pack(i), [self.calls[i]])
            self.send(vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(i, 1))
        return self

    def kick(self, ring):
        os.eventfd_write(self.kicks[ring], 1)
        self.link.device.rings[ring].kick.doRead()

    def close(self):
        self.sock.close()
        for fd in (*self.kicks, *self.calls, self.memfd):
            os.close(fd)


@pytest.fixture
def vlink(tmp_path):
    reactor = MemoryReactorClock()
    link = link_vu.VhostUserLink.listen(str(tmp_path / "vu.sock"), reactor=reactor)
    sink = Sink()
    link.start(sink)
    fronts = []

    def connect():
        fronts.append(FrontEnd(link))
        return fronts[-1]

    link.connect = connect
    link.sink = sink
    link.clock = reactor
    yield link
    link.stop()
    for f in fronts:
        f.close()


def test_frames_flow_both_ways_and_the_guest_is_interrupted(vlink):
    front = vlink.connect().set_up()
    assert vlink.capabilities.gso_tcpv4 and vlink.capabilities.vnet_header_len == 12
    front.tx.post_tx(HEADER + FRAME)
    front.kick(link_vu.TX)
    assert vlink.sink.frames == [FRAME]
    head = front.rx.post_rx(1024)
    front.kick(link_vu.RX)
    vlink.send_frame([FRAME[:20], FRAME[20:]])
    [(used_head, n)] = front.rx.used_entries()
    assert used_head == head and front.rx.read_rx(head, n)[12:] == FRAME
    vlink.clock.advance(0)
    assert os.eventfd_read(front.calls[link_vu.RX]) == 1


def test_frames_wait_for_receive_buffers(vlink):
    front = vlink.connect().set_up()
    vlink.send_frame(FRAME)
    assert vlink.queued_frames == 1
    front.rx.post_rx(1024)
    front.kick(link_vu.RX)
    assert vlink.queued_frames == 0 and len(front.rx.used_entries()) == 1


def test_bad_vnet_headers_from_the_guest_are_dropped_and_counted(vlink):
    front = vlink.connect().set_up()
    front.tx.post_tx(vnet.build(12, gso_type=9) + FRAME)
    front.kick(link_vu.TX)
    assert vlink.sink.frames == [] and vlink.drops["bad-vnet-gso-type"] == 1


def _hostile_loop(front):
    addr, _ = front.tx.buffer(0, 64)
    front.tx.set_desc(0, addr, 64, DESC_F_NEXT, 1)
    front.tx.set_desc(1, addr, 64, DESC_F_NEXT, 0)
    front.tx.publish(0)
    front.kick(link_vu.TX)


def _hostile_outside(front):
    front.tx.set_desc(0, 0xDEAD0000000, 64)
    front.tx.publish(0)
    front.kick(link_vu.TX)


def _hostile_jump(front):
    front.rx.set_avail_idx(NUM * 3)
    front.kick(link_vu.RX)
    front.link.send_frame(FRAME)


def _hostile_message(front):
    front.send(vu.SET_VRING_NUM, b"\0" * 3)


def _hostile_missing_fd(front):
    front.send(vu.SET_VRING_CALL, vu.U64.pack(0))


def _hostile_ring_index(front):
    front.send(vu.SET_VRING_NUM, vu.VRING_STATE.pack(7, 256))


def _hostile_region_past_file(front):
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    region = vu.MemoryRegion(GUEST_BASE, MEM_SIZE, USER_BASE, 0)
    front.send(vu.SET_MEM_TABLE, vu.memory_table([region]), [fd])
    os.close(fd)


def _hostile_log(front):
    front.send(vu.SET_FEATURES, vu.U64.pack(1 << vu.F_LOG_ALL))


@pytest.mark.parametrize("attack", [_hostile_loop, _hostile_outside, _hostile_jump,
                                    _hostile_message, _hostile_missing_fd, _hostile_ring_index,
                                    _hostile_region_past_file, _hostile_log])
def test_a_hostile_driver_or_front_end_closes_only_its_connection(vlink, attack):
    before = len(os.listdir("/proc/self/fd"))
    front = vlink.connect().set_up()
    attack(front)
    assert front.closed()
    # Every fd and map of the device is gone; only the test's own remain
    # (socket, memfd and its map, two kick and two call eventfds).
    assert len(os.listdir("/proc/self/fd")) == before + 7
    assert vlink._conn is None and vlink.devices_broken == 1
    assert not vlink.sink.lost and not vlink._stopped
    # The next front-end gets a fresh device that works.
    again = vlink.connect().set_up()
    again.tx.post_tx(HEADER + FRAME)
    again.kick(link_vu.TX)
    assert vlink.sink.frames[-1] == FRAME


def test_migration_requests_are_refused_with_a_failed_ack(vlink):
    front = vlink.connect().set_up()
    front.send(vu.SET_LOG_FD, b"", [os.dup(front.memfd)], need_reply=True)
    assert front.reply() == (vu.SET_LOG_FD, vu.U64.pack(1))
    assert not front.closed() and vlink._conn is not None


def test_get_vring_base_stops_the_ring_and_a_disconnect_frees_the_device(vlink):
    front = vlink.connect().set_up()
    front.tx.post_tx(HEADER + FRAME)
    front.kick(link_vu.TX)
    front.send(vu.GET_VRING_BASE, vu.VRING_STATE.pack(link_vu.TX, 0))
    assert front.reply() == (vu.GET_VRING_BASE, vu.VRING_STATE.pack(link_vu.TX, 1))
    assert vlink.device.queue(link_vu.TX) is None
    front.sock.close()
    vlink._conn.doRead()
    assert vlink._conn is None and vlink.devices_broken == 0
    vlink.send_frame(FRAME)
    assert vlink.drops["no-peer"] == 1


# -- a guest without offloads: frames finished in software


def _gso_frame(payload, flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH | dpkt.tcp.TH_FIN):
    seg = dpkt.tcp.TCP(sport=80, dport=4000, seq=1000, ack=5, flags=flags, win=500, data=payload)
    seg.sum = 1  # anything: the offload path rewrites it
    ip = framebuild.ipv4(seg, 6, src="10.0.2.1", dst="10.0.2.2", id=77)
    return framebuild.ethernet(ip, src=framebuild.GATEWAY_MAC, dst=framebuild.GUEST_MAC)


def _with_dpkt_sums(frame):
    """(ip sum, tcp sum) as ours, and as dpkt computes them."""
    eth = dpkt.ethernet.Ethernet(frame)
    ip, seg = eth.data, eth.data.data
    ours = (ip.sum, seg.sum)
    ip.sum = seg.sum = 0
    again = dpkt.ethernet.Ethernet(bytes(eth))
    return ours, (again.data.sum, again.data.data.sum), eth.data


def test_a_gso_frame_is_cut_into_segments_with_full_checksums():
    payload = bytes(range(256)) * 20  # 5120 bytes
    header = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    out = softoffload.finish(_gso_frame(payload), header, csum=False, tso4=False)
    assert [h for _, h in out] == [None] * 4
    got = b""
    for i, (frame, _) in enumerate(out):
        ours, theirs, ip = _with_dpkt_sums(frame)
        assert ours == theirs
        seg = ip.data
        assert seg.seq == 1000 + 1448 * i and ip.id == 77 + i
        assert bool(seg.flags & dpkt.tcp.TH_FIN) == (i == 3)
        assert ip.len == 40 + len(seg.data)
        got += seg.data
    assert got == payload


def test_a_partial_checksum_is_finished_for_a_guest_without_guest_csum():
    frame = bytearray(_gso_frame(b"x" * 100))
    # The framer's form: the TCP checksum field holds the pseudo-header sum.
    from arcbox_net.wire.checksum import pseudo_header_sum
    struct.pack_into("!H", frame, 34 + 16, pseudo_header_sum(framebuild.ip4("10.0.2.1"),
                                                             framebuild.ip4("10.0.2.2"), 6, 120))
    header = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 34, 16)
    [(done, h)] = softoffload.finish(bytes(frame), header, csum=False, tso4=False)
    ours, theirs, _ = _with_dpkt_sums(done)
    assert h is None and ours == theirs
    # A guest that takes the offloads gets the frame as it is.
    assert softoffload.finish(bytes(frame), header) == [(bytes(frame), header)]


def test_the_link_finishes_frames_for_a_guest_that_declined_offloads(vlink):
    front = vlink.connect()
    front.send(vu.SET_FEATURES, vu.U64.pack(1 << link_vu.F_VERSION_1
                                            | 1 << link_vu.NET_F_MRG_RXBUF
                                            | 1 << vu.F_PROTOCOL_FEATURES))
    front.set_up(features=None)
    for _ in range(4):
        front.rx.post_rx(2048)
    front.kick(link_vu.RX)
    header = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    vlink.send_frame(_gso_frame(b"y" * 3000), header)
    used = front.rx.used_entries()
    assert len(used) == 3 and vlink.soft_offloaded == 1
    for head, n in used:
        data = front.rx.read_rx(head, n)
        assert data[:2] == b"\0\0"  # complete frames: no offload flags
        ours, theirs, _ = _with_dpkt_sums(data[12:])
        assert ours == theirs


def test_embedders_open_the_link_by_path(tmp_path):
    from arcbox_net.config import StackConfig
    from arcbox_net.link import open_link
    path = tmp_path / "embed.sock"
    link = open_link(StackConfig(mtu=9000), vhost_user=str(path), reactor=MemoryReactorClock())
    try:
        assert isinstance(link, link_vu.VhostUserLink)
        assert path.stat().st_mode & 0o777 == 0o600
        assert link.capabilities.max_frame == 9014 and link.capabilities.vnet_header_len == 12
    finally:
        link.stop()
    assert not path.exists()
    with pytest.raises(ValueError, match="exactly one"):
        open_link(StackConfig(), vhost_user=str(path), listen_stream=str(path))


# -- IPv6: TSO6 both ways


def _gso_frame6(payload, flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH | dpkt.tcp.TH_FIN,
                src="fd00::1", dst="fd00::2"):
    seg = dpkt.tcp.TCP(sport=80, dport=4000, seq=1000, ack=5, flags=flags, win=500, data=payload)
    seg.sum = 1  # anything: the offload path rewrites it
    ip = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src),
                      dst=socket.inet_pton(socket.AF_INET6, dst), nxt=6, hlim=64, data=seg)
    ip.plen = len(seg)
    return framebuild.ethernet(bytes(ip), ethertype=0x86DD, src=framebuild.GATEWAY_MAC,
                               dst=framebuild.GUEST_MAC)


def _tcp6_sum_ok(frame):
    """Our TCP checksum equals dpkt's (which sums a zero field itself); the segment."""
    ip = dpkt.ip6.IP6(frame[14:])
    seg = ip.data
    ours = seg.sum
    seg.sum = 0
    again = dpkt.ip6.IP6(bytes(ip))
    return ours == again.data.sum, dpkt.ip6.IP6(frame[14:])


def test_tso6_is_offered_and_declared_so_v6_tcp_leaves_as_64k_gso_frames(vlink):
    from arcbox_net.config import StackConfig
    from arcbox_net.framer import Framer
    assert link_vu.OFFERED_FEATURES >> link_vu.NET_F_HOST_TSO6 & 1
    assert link_vu.OFFERED_FEATURES >> link_vu.NET_F_GUEST_TSO6 & 1
    front = vlink.connect()
    front.send(vu.GET_FEATURES)
    _, offered = front.reply()
    assert vu.u64(offered) == link_vu.OFFERED_FEATURES
    assert vlink.capabilities.gso_tcpv6 and vlink.capabilities.gso_tcpv4
    framer = Framer(StackConfig(), vlink)
    assert framer.tcp_segment_limit6 > 60000
    # What the framer sends a v6 guest: one GSO_TCPV6 frame, csum_start past the 40 bytes.
    sent = []
    vlink.send_frame = lambda frame, meta=None: sent.append((frame, meta))
    guest = socket.inet_pton(socket.AF_INET6, "fd00::2")
    framer.learn(guest, framebuild.GUEST_MAC, 0.0)
    framer.send_tcp(socket.inet_pton(socket.AF_INET6, "fd00::1"), guest, 80, 4000, 1, 1, 0x10,
                    500, b"z" * 30000, segment_size=1428)
    [(frame, meta)] = sent
    flags, gso_type, hdr_len, gso_size, csum_start, _ = vnet.parse(meta, 30074)
    assert (flags, gso_type, gso_size) == (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 1428)
    assert (csum_start, hdr_len) == (54, 74) and sum(map(len, frame)) == 30074


@pytest.mark.parametrize("family", [4, 6])
def test_a_guest_tso_frame_of_either_family_is_taken_whole(vlink, family):
    front = vlink.connect().set_up()
    payload = bytes(range(256)) * 80  # 20480 bytes: one TSO frame, far above the MTU
    if family == 6:
        frame = _gso_frame6(payload, src="fd00::2", dst="fd00::1")
        header = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 74, 1428, 54, 16)
    else:
        frame = _gso_frame(payload)
        header = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    parts = [frame[i:i + 8000] for i in range(0, len(frame), 8000)]
    front.tx.post_tx(header + parts[0], *parts[1:])
    front.kick(link_vu.TX)
    assert vlink.sink.frames == [frame] and not vlink.drops


def test_a_guest_without_host_tso_gets_no_frame_above_the_mtu_taken(vlink):
    front = vlink.connect()
    front.send(vu.SET_FEATURES, vu.U64.pack(1 << link_vu.F_VERSION_1
                                            | 1 << link_vu.NET_F_MRG_RXBUF
                                            | 1 << vu.F_PROTOCOL_FEATURES))
    front.set_up(features=None)
    frame = _gso_frame6(b"q" * 5000, src="fd00::2", dst="fd00::1")
    header = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 74, 1428, 54, 16)
    front.tx.post_tx(header + frame[:4000], frame[4000:])
    front.kick(link_vu.TX)
    assert vlink.sink.frames == [] and sum(vlink.drops.values()) == 1


def test_a_tcpv6_gso_frame_is_cut_into_segments_with_full_checksums():
    payload = bytes(range(256)) * 20  # 5120 bytes
    header = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 74, 1428, 54, 16)
    out = softoffload.finish(_gso_frame6(payload), header, csum=True, tso4=True, tso6=False)
    assert [h for _, h in out] == [None] * 4
    got = b""
    for i, (frame, _) in enumerate(out):
        ok, ip = _tcp6_sum_ok(frame)
        seg = ip.data
        assert ok and seg.seq == 1000 + 1428 * i
        assert bool(seg.flags & dpkt.tcp.TH_FIN) == (i == 3)
        assert bool(seg.flags & dpkt.tcp.TH_PUSH) == (i == 3)
        assert ip.plen == 20 + len(seg.data) and len(frame) == 14 + 40 + ip.plen
        got += seg.data
    assert got == payload
    # A guest with TSO6 gets the GSO frame as it is; a lying frame is refused.
    frame = _gso_frame6(payload)
    assert softoffload.finish(frame, header) == [(frame, header)]
    with pytest.raises(softoffload.OffloadError):
        softoffload.finish(_gso_frame(payload), header, tso6=False)


def test_the_link_cuts_v6_gso_frames_for_a_guest_without_guest_tso6(vlink):
    front = vlink.connect()
    front.send(vu.SET_FEATURES, vu.U64.pack(1 << link_vu.F_VERSION_1
                                            | 1 << link_vu.NET_F_MRG_RXBUF
                                            | 1 << link_vu.NET_F_CSUM
                                            | 1 << link_vu.NET_F_GUEST_CSUM
                                            | 1 << link_vu.NET_F_GUEST_TSO4
                                            | 1 << vu.F_PROTOCOL_FEATURES))
    front.set_up(features=None)
    for _ in range(4):
        front.rx.post_rx(4096)
    front.kick(link_vu.RX)
    header6 = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 74, 1428, 54, 16)
    vlink.send_frame(_gso_frame6(b"y" * 3000), header6)
    used = front.rx.used_entries()
    assert len(used) == 3 and vlink.soft_offloaded == 1
    for head, n in used:
        data = front.rx.read_rx(head, n)
        assert data[:2] == b"\0\0"  # complete frames: no offload flags
        assert _tcp6_sum_ok(data[12:])[0]
    # The same guest took TSO4: a v4 GSO frame goes to it whole.
    header4 = vnet.build(12, vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    vlink.send_frame(_gso_frame(b"w" * 3000), header4)
    [(head, n)] = front.rx.used_entries()
    assert front.rx.read_rx(head, n)[:12] == header4 and vlink.soft_offloaded == 1
