"""``--vhost-user PATH``: the stack as a vhost-user net back-end for QEMU.

QEMU keeps the virtio-net device model (PCI, config space, the guest's
feature bits for MAC/STATUS) and hands its datapath to us: over the unix
socket it sends the guest's memory (memfd regions, which we mmap) and, per
virtqueue, where the rings are and two eventfds: *kick* (the guest posted
buffers; a reactor reader) and *call* (we used some; we write it). Frames
then go straight between guest memory and the stack: TX chains are copied
once into the frame the dispatcher gets, and the framer's buffers (headers
plus the host socket's data) are gathered once into the guest's RX buffers.

Offloads: we offer VERSION_1, MRG_RXBUF, CSUM/GUEST_CSUM,
HOST_TSO4/GUEST_TSO4 and HOST_TSO6/GUEST_TSO6. The link declares checksum
offload and TCP GSO of both families from the start (the stack sizes its TCP
segments once, before any guest has negotiated), so TCP leaves as 64 KiB GSO
frames with partial checksums; for a guest that turned GUEST_CSUM or a
GUEST_TSO down, ``softoffload`` finishes them here. The guest's own TSO
frames (HOST_TSO4/HOST_TSO6) arrive whole and go to the dispatcher like the
TAP's. RX chains taken while a frame waits for more
buffers are kept, not walked again, and the guest is asked to kick only
while frames wait.

Robustness: QEMU and the guest are untrusted. A message of the wrong size,
with the wrong fds, or any ring rule broken (``virtqueue.VirtqueueError``)
marks the device broken: one log line, the connection and every fd and map
of it closed, and the listener waits for the next front-end, which gets a
fresh device. Dirty-page logging (live migration) is never offered and
refused if asked for. One front-end at a time.
"""

import fcntl
import mmap
import os
import socket
import stat
import threading
from collections import deque

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import ILink, LinkCapabilities
from ..wire import MalformedFrame, vnet
from ..wire import vhost_user as vu
from . import softoffload
from .base import LinkState, OnePeerListener, deliver, describe_error
from .unixsock import bind_unix, max_frame_len, unlink_if_ours
from .virtqueue import (FrameTooBig, GuestMemory, Virtqueue, VirtqueueError, put_frame,
                        take_frame)

# virtio-net feature bits (virtio 1.x, 5.1.3).
NET_F_CSUM = 0
NET_F_GUEST_CSUM = 1
NET_F_GUEST_TSO4 = 7
NET_F_GUEST_TSO6 = 8
NET_F_HOST_TSO4 = 11
NET_F_HOST_TSO6 = 12
NET_F_MRG_RXBUF = 15
F_VERSION_1 = 32

OFFERED_FEATURES = (1 << F_VERSION_1 | 1 << NET_F_MRG_RXBUF | 1 << NET_F_CSUM
                    | 1 << NET_F_GUEST_CSUM | 1 << NET_F_HOST_TSO4 | 1 << NET_F_GUEST_TSO4
                    | 1 << NET_F_HOST_TSO6 | 1 << NET_F_GUEST_TSO6
                    | 1 << vu.F_PROTOCOL_FEATURES)
OFFERED_PROTOCOL_FEATURES = 1 << vu.PROTOCOL_F_REPLY_ACK
RX, TX = 0, 1
NUM_RINGS = 2
#: The largest frame a guest with HOST_TSO4/HOST_TSO6 sends: 64 KiB of IP (an IPv6
#: payload length leaves out its 40-byte header) plus Ethernet and a VLAN tag.
MAX_TSO_FRAME = 65535 + 40 + 14 + 4
#: GSO types (vnet.GSO_*, ECN bit clear) -> the feature a guest takes them with.
_GUEST_GSO = {vnet.GSO_TCPV4: NET_F_GUEST_TSO4, vnet.GSO_TCPV6: NET_F_GUEST_TSO6}
#: Frames waiting for RX buffers at most (the guest is slow to post them); beyond, dropped.
RX_QUEUE_LIMIT = 1024
_ONE = (1).to_bytes(8, "little")
#: Seconds before frames waiting for RX buffers are tried again without a kick.
RX_RETRY = 0.01
_BARRIER_LOCK = threading.Lock()
#: fds one message may carry: a memory table's regions.
_ANCILLARY = socket.CMSG_SPACE(vu.MAX_REGIONS * 4)


def _barrier():
    """A full memory barrier (a locked instruction) between our store to the used
    ring's flags and our next load of avail.idx: x86 may reorder a store after a
    later load, and the guest could then miss our request to kick."""
    _BARRIER_LOCK.acquire()
    _BARRIER_LOCK.release()


class DeviceBroken(Exception):
    """The front-end or the guest broke the rules; the device is closed."""


def _close(fd):
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


@implementer(IReadDescriptor)
class _Kick:
    """A kick eventfd in the reactor: the guest posted buffers on a ring."""

    def __init__(self, fd, ring, device):
        self.fd = fd
        self.ring = ring
        self.device = device

    def fileno(self):
        return self.fd

    def logPrefix(self):
        return "arcbox-vhost-user"

    def doRead(self):
        try:
            while True:
                os.read(self.fd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self.device.fail(DeviceBroken(f"kick eventfd of ring {self.ring}: "
                                          f"{describe_error(e)}"))
            return None
        self.device.kicked(self.ring)
        return None

    def connectionLost(self, reason):
        pass


class _Ring:
    """What the front-end told us about one virtqueue."""

    def __init__(self, index):
        self.index = index
        self.num = None
        self.addr = None  # (desc, used, avail) front-end addresses
        self.base = 0
        self.kick = None  # a _Kick in the reactor
        self.call_fd = None
        self.err_fd = None
        self.enabled = False
        self.queue = None  # the Virtqueue once started

    def close(self, reactor):
        if self.kick is not None:
            reactor.removeReader(self.kick)
            _close(self.kick.fd)
            self.kick = None
        _close(self.call_fd)
        _close(self.err_fd)
        self.call_fd = self.err_fd = None
        if self.queue is not None:
            self.queue.release()
            self.queue = None


class VhostUserDevice:
    """One front-end connection's device: protocol state, memory, rings.

    ``handle(message)`` takes one checked message and returns the bytes to
    answer (possibly none); raises DeviceBroken or ProtocolError. The link
    (``owner``) gets ``_tx_ready(device)``, ``_rx_ready(device)`` and
    ``_features_changed(device)``.
    """

    def __init__(self, owner, reactor, log):
        self.owner = owner
        self.reactor = reactor
        self.log = log
        self.features = 0
        self.protocol_features = 0
        self.owned = False
        self.memory = None
        self._maps = []
        self.rings = [_Ring(i) for i in range(NUM_RINGS)]
        self.broken = False
        self.closed = False
        self._call_pending = set()
        self._refused = set()
        self._warned_unsealed = False

    # -- negotiated

    def has(self, bit):
        return bool(self.features >> bit & 1)

    @property
    def header_len(self):
        """virtio_net_hdr_v1 (12) with VERSION_1 or MRG_RXBUF, else the legacy 10."""
        if self.has(F_VERSION_1) or self.has(NET_F_MRG_RXBUF):
            return vnet.HEADER_V1_LEN
        return vnet.HEADER_LEN

    def queue(self, index):
        """The ring's Virtqueue when it is running and enabled, else None."""
        ring = self.rings[index]
        return ring.queue if ring.enabled else None

    # -- messages

    def handle(self, msg):
        request = msg.request
        handler = _HANDLERS.get(request)
        if handler is None:
            return self._refuse(msg)
        answer = handler(self, msg)
        if answer is not None:
            return answer
        if (msg.need_reply and request not in vu.HAS_REPLY
                and self.protocol_features >> vu.PROTOCOL_F_REPLY_ACK & 1):
            return vu.reply_u64(request, 0)
        return b""

    def _refuse(self, msg):
        for fd in msg.fds:
            _close(fd)
        if msg.request not in self._refused:
            self._refused.add(msg.request)
            if msg.request in vu.MIGRATION:
                self.log.error("vhost-user: refusing {name}: dirty-page logging (live "
                               "migration) is not implemented", name=msg.name)
            else:
                self.log.warn("vhost-user: refusing {name}: not implemented", name=msg.name)
        if msg.need_reply:
            return vu.reply_u64(msg.request, 1)
        return b""

    def _ring(self, index):
        if index >= NUM_RINGS:
            raise DeviceBroken(f"ring {index} (this device has {NUM_RINGS})")
        return self.rings[index]

    def _get_features(self, msg):
        return vu.reply_u64(msg.request, OFFERED_FEATURES)

    def _set_features(self, msg):
        features = vu.u64(msg.payload)
        if features >> vu.F_LOG_ALL & 1:
            raise DeviceBroken("the front-end asked for dirty-page logging (live migration), "
                               "which this back-end does not implement")
        if features & ~OFFERED_FEATURES:
            raise DeviceBroken(f"features {features & ~OFFERED_FEATURES:#x} were not offered")
        self.features = features
        if not self.has(vu.F_PROTOCOL_FEATURES):
            # Without protocol features, rings are enabled from the start.
            for ring in self.rings:
                ring.enabled = True
        self.owner._features_changed(self)

    def _get_protocol_features(self, msg):
        return vu.reply_u64(msg.request, OFFERED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg):
        features = vu.u64(msg.payload)
        if features & ~OFFERED_PROTOCOL_FEATURES:
            raise DeviceBroken(f"protocol features {features & ~OFFERED_PROTOCOL_FEATURES:#x} "
                               "were not offered")
        self.protocol_features = features

    def _get_queue_num(self, msg):
        return vu.reply_u64(msg.request, 1)

    def _set_owner(self, msg):
        self.owned = True

    def _reset_owner(self, msg):
        self.reset()

    def _set_mem_table(self, msg):
        regions = vu.memory_regions(msg.payload)
        maps, mapped = [], []
        try:
            for region, fd in zip(regions, msg.fds):
                end = region.mmap_offset + region.size
                st = os.fstat(fd)
                self._check_sealed(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size < end:
                    # Touching a page past the file's end would be SIGBUS.
                    raise DeviceBroken(f"memory region of {region.size} bytes at offset "
                                       f"{region.mmap_offset} is past its file's end "
                                       f"({st.st_size} bytes)")
                try:
                    m = mmap.mmap(fd, end, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError, OverflowError) as e:
                    raise DeviceBroken(f"cannot map a memory region of {region.size} bytes: "
                                       f"{describe_error(e)}") from None
                maps.append(m)
                mapped.append((region.guest_addr, region.size, region.user_addr,
                               memoryview(m)[region.mmap_offset:end]))
            memory = GuestMemory(mapped)
        except (DeviceBroken, VirtqueueError):
            for _, _, _, view in mapped:
                view.release()
            _unmap(maps)
            raise
        finally:
            for fd in msg.fds:
                _close(fd)
        for _, _, _, view in mapped:
            view.release()  # GuestMemory keeps its own
        old_memory, old_maps = self.memory, self._maps
        self.memory, self._maps = memory, maps
        # Running rings now read the new table (memory hot-plug keeps their indices).
        for ring in self.rings:
            if ring.queue is not None:
                last = ring.queue.next_avail
                ring.queue.release()
                ring.queue = None
                ring.base = last
                self._start(ring)
        if old_memory is not None:
            old_memory.release()
        _unmap(old_maps)

    def _check_sealed(self, fd):
        """Warn once about guest memory its owner may shrink under us.

        A page past the end of a shrunk file is SIGBUS, which would kill the
        stack; QEMU seals its memfd backends against shrinking (seal=on, the
        default). Other memory (hugetlbfs, unsealed memfd) works, with that risk.
        """
        try:
            sealed = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        except OSError:
            sealed = False
        if not sealed and not self._warned_unsealed:
            self._warned_unsealed = True
            self.log.warn("vhost-user: guest memory is not sealed against shrinking "
                          "(memory-backend-memfd seal=on is the safe default); a front-end "
                          "that shrinks it would crash the stack")

    def _set_vring_num(self, msg):
        index, num = vu.vring_state(msg.payload)
        ring = self._ring(index)
        if not 1 <= num <= 32768 or num & (num - 1):
            raise DeviceBroken(f"ring {index} size {num} is not a power of 2 up to 32768")
        ring.num = num

    def _set_vring_addr(self, msg):
        index, flags, desc, used, avail, log = vu.vring_addr(msg.payload)
        ring = self._ring(index)
        if flags & 1:  # VHOST_VRING_F_LOG
            raise DeviceBroken("the front-end asked to log the used ring (live migration), "
                               "which this back-end does not implement")
        ring.addr = (desc, used, avail)

    def _set_vring_base(self, msg):
        index, base = vu.vring_state(msg.payload)
        ring = self._ring(index)
        if base > 0xFFFF:
            raise DeviceBroken(f"ring {index} base {base} is past 16 bits")
        ring.base = base

    def _get_vring_base(self, msg):
        index, _ = vu.vring_state(msg.payload)
        ring = self._ring(index)
        base = ring.queue.next_avail if ring.queue is not None else ring.base
        # GET_VRING_BASE stops the ring.
        if ring.kick is not None:
            self.reactor.removeReader(ring.kick)
            _close(ring.kick.fd)
            ring.kick = None
        if ring.queue is not None:
            ring.queue.release()
            ring.queue = None
        ring.base = base
        if self.has(vu.F_PROTOCOL_FEATURES):
            ring.enabled = False
        return vu.reply(msg.request, vu.VRING_STATE.pack(index, base))

    def _vring_fd(self, msg):
        value = vu.u64(msg.payload)
        ring = self._ring(value & vu.VRING_INDEX_MASK)
        if value & ~(vu.VRING_INDEX_MASK | vu.VRING_NOFD):
            raise DeviceBroken(f"{msg.name} with unknown bits {value:#x}")
        return ring, (msg.fds[0] if msg.fds else None)

    def _set_vring_kick(self, msg):
        ring, fd = self._vring_fd(msg)
        if fd is None:
            raise DeviceBroken(f"ring {ring.index} without a kick fd (polling is not "
                               "implemented)")
        if ring.kick is not None:
            self.reactor.removeReader(ring.kick)
            _close(ring.kick.fd)
        os.set_blocking(fd, False)
        ring.kick = _Kick(fd, ring.index, self)
        if ring.queue is None:
            self._start(ring)
        self.reactor.addReader(ring.kick)
        self.kicked(ring.index)  # buffers may be waiting already

    def _set_vring_call(self, msg):
        ring, fd = self._vring_fd(msg)
        _close(ring.call_fd)
        ring.call_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    def _set_vring_err(self, msg):
        ring, fd = self._vring_fd(msg)
        _close(ring.err_fd)
        ring.err_fd = fd

    def _set_vring_enable(self, msg):
        index, enable = vu.vring_state(msg.payload)
        ring = self._ring(index)
        if enable > 1:
            raise DeviceBroken(f"SET_VRING_ENABLE {enable} for ring {index}")
        ring.enabled = bool(enable)
        if ring.enabled:
            self.kicked(index)

    def _start(self, ring):
        """The ring has its kick: build its Virtqueue over the memory table."""
        if self.memory is None or ring.num is None or ring.addr is None:
            raise DeviceBroken(f"ring {ring.index} kicked off before its memory, size and "
                               "addresses")
        desc, used, avail = ring.addr
        try:
            ring.queue = Virtqueue(self.memory, ring.num, desc, avail, used, ring.base)
        except VirtqueueError as e:
            raise DeviceBroken(f"ring {ring.index}: {e}") from None

    # -- the datapath

    def kicked(self, index):
        if self.closed:
            return
        if index == TX:
            self.owner._tx_ready(self)
        else:
            self.owner._rx_ready(self)

    def used(self, index):
        """We returned chains on ring ``index``: interrupt the guest at the end of the turn."""
        if not self._call_pending:
            self.reactor.callLater(0, self._signal)
        self._call_pending.add(index)

    def _signal(self):
        pending, self._call_pending = self._call_pending, set()
        if self.closed:
            return
        # Our used.idx stores must be visible before we read the driver's
        # flags: it re-enables interrupts, then reads used.idx.
        _barrier()
        for index in pending:
            ring = self.rings[index]
            queue = ring.queue
            if ring.call_fd is None or queue is None:
                continue
            try:
                if not queue.needs_notify():
                    continue
                os.write(ring.call_fd, _ONE)
            except (BlockingIOError, InterruptedError):
                pass  # the counter is saturated: the guest will look anyway
            except (OSError, VirtqueueError) as e:
                self.fail(DeviceBroken(f"call eventfd of ring {index}: {describe_error(e)}"))
                return

    def fail(self, error):
        self.owner._device_failed(self, error)

    # -- teardown

    def reset(self):
        for ring in self.rings:
            ring.close(self.reactor)
        self.rings = [_Ring(i) for i in range(NUM_RINGS)]
        self.features = 0
        if self.memory is not None:
            self.memory.release()
            self.memory = None
        _unmap(self._maps)
        self._maps = []

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.reset()


def _unmap(maps):
    for m in maps:
        try:
            m.close()
        except BufferError:
            pass  # a view still lives (a frame in flight): the map goes with it


_HANDLERS = {
    vu.GET_FEATURES: VhostUserDevice._get_features,
    vu.SET_FEATURES: VhostUserDevice._set_features,
    vu.GET_PROTOCOL_FEATURES: VhostUserDevice._get_protocol_features,
    vu.SET_PROTOCOL_FEATURES: VhostUserDevice._set_protocol_features,
    vu.GET_QUEUE_NUM: VhostUserDevice._get_queue_num,
    vu.SET_OWNER: VhostUserDevice._set_owner,
    vu.RESET_OWNER: VhostUserDevice._reset_owner,
    vu.SET_MEM_TABLE: VhostUserDevice._set_mem_table,
    vu.SET_VRING_NUM: VhostUserDevice._set_vring_num,
    vu.SET_VRING_ADDR: VhostUserDevice._set_vring_addr,
    vu.SET_VRING_BASE: VhostUserDevice._set_vring_base,
    vu.GET_VRING_BASE: VhostUserDevice._get_vring_base,
    vu.SET_VRING_KICK: VhostUserDevice._set_vring_kick,
    vu.SET_VRING_CALL: VhostUserDevice._set_vring_call,
    vu.SET_VRING_ERR: VhostUserDevice._set_vring_err,
    vu.SET_VRING_ENABLE: VhostUserDevice._set_vring_enable,
}


@implementer(IReadDescriptor)
class _Connection:
    """The front-end's socket in the reactor: messages in, replies out."""

    read_size = 4096

    def __init__(self, sock, link, reactor):
        self.sock = sock
        self.link = link
        self.reactor = reactor
        self.reader = vu.MessageReader()
        self.device = VhostUserDevice(link, reactor, link.log)
        self.closed = False

    def start(self):
        self.sock.setblocking(False)
        self.reactor.addReader(self)

    def fileno(self):
        return -1 if self.closed else self.sock.fileno()

    def logPrefix(self):
        return "arcbox-vhost-user"

    def doRead(self):
        while not self.closed:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(self.read_size, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                self.link._connection_gone(self, e)
                return None
            fds = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(payload) // 4
                    fds.extend(int.from_bytes(payload[i * 4:i * 4 + 4], "little")
                               for i in range(n))
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    _close(fd)
                self.link._connection_gone(self, vu.ProtocolError(
                    f"more than {vu.MAX_REGIONS} fds with one message"))
                return None
            if not data:
                for fd in fds:
                    _close(fd)
                self.link._connection_gone(self, None)
                return None
            try:
                messages = self.reader.feed(data, fds)
                for msg in messages:
                    answer = self.device.handle(msg)
                    if answer and not self.closed:
                        self.sock.sendall(answer)
                    if self.closed:
                        return None
            except (vu.ProtocolError, DeviceBroken, VirtqueueError, OSError) as e:
                self.link._connection_gone(self, e)
                return None
            except Exception as e:  # a bug must not take the listener down with it
                self.link.log.failure("vhost-user: handling a message failed")
                self.link._connection_gone(self, e)
                return None
        return None

    def connectionLost(self, reason):
        self.link._connection_gone(self, reason.value if isinstance(reason, Failure) else reason)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.reactor.removeReader(self)
        self.device.close()
        for fd in self.reader.pending_fds:
            _close(fd)
        self.reader.clear()
        self.sock.close()


@implementer(ILink, IReadDescriptor)
class VhostUserLink(OnePeerListener, LinkState):
    """``--vhost-user PATH``: listen for one vhost-user front-end at a time.

    A front-end leaving (QEMU exits, is killed, or breaks the rules) is
    logged, not a lost link: the next one gets a fresh device. Frames for a
    guest with no running RX ring are dropped and counted (``no-peer``);
    frames waiting for RX buffers queue (``RX_QUEUE_LIMIT``, then
    ``rx-queue-full``).
    """

    def __init__(self, listener, path, inode=None, mtu=1500, reactor=None):
        super().__init__(f"vhost-user socket {path}", mtu=mtu, reactor=reactor)
        self._listener = listener
        self.path = path
        self._inode = inode
        self.max_frame = max_frame_len(mtu)
        self._conn = None
        self._rx_queue = deque()
        self._tx_again = None
        self._rx_retry = None
        #: Frames finished in software for a guest without an offload.
        self.soft_offloaded = 0
        self.peers_served = 0
        self.peers_refused = 0
        self.devices_broken = 0

    @classmethod
    def listen(cls, path, mtu=1500, reactor=None):
        sock, inode = bind_unix(path, socket.SOCK_STREAM)
        sock.listen(4)
        return cls(sock, path, inode, mtu=mtu, reactor=reactor)

    @property
    def device(self):
        conn = self._conn
        return conn.device if conn is not None else None

    @property
    def capabilities(self):
        """Offloads declared before any guest negotiated: the stack sizes its TCP
        segments once, at start. A guest that turns GUEST_CSUM, GUEST_TSO4 or
        GUEST_TSO6 down gets its frames finished by ``softoffload`` (Linux
        takes them all)."""
        return LinkCapabilities(max_frame=14 + self.mtu, vnet_header_len=vnet.HEADER_V1_LEN,
                                csum_offload=True, gso_tcpv4=True, gso_tcpv6=True)

    @property
    def queued_frames(self):
        return len(self._rx_queue)

    # -- ILink

    def start(self, sink):
        self._sink = sink
        self._reactor.addReader(self)

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        self._reactor.removeReader(self)
        self._drop_connection()
        self._listener.close()
        unlink_if_ours(self.path, self._inode)

    def send_frame(self, frame, vnet_header=None):
        if self._stopped:
            return
        dev = self.device
        if dev is None or dev.queue(RX) is None:
            self.drops["no-peer"] += 1
            return
        if isinstance(frame, (bytes, bytearray, memoryview)):
            parts = [frame]
        else:
            parts = list(frame)
        if vnet_header is None:
            header = vnet.zero(dev.header_len)
        else:
            header = vnet_header
            gso = header[1]
            if ((header[0] & vnet.F_NEEDS_CSUM and not dev.has(NET_F_GUEST_CSUM))
                    or (gso and not dev.has(_GUEST_GSO.get(gso & ~vnet.GSO_ECN, 64)))):
                self._send_finished(dev, b"".join(parts), header)
                return
            if len(header) != dev.header_len:
                header = bytes(header[:vnet.HEADER_LEN]).ljust(dev.header_len, b"\0")
        length = sum(len(p) for p in parts)
        if self._rx_queue or not self._put(dev, header, parts, length):
            if len(self._rx_queue) >= RX_QUEUE_LIMIT:
                self.drops["rx-queue-full"] += 1
                return
            # The caller may reuse its buffers: keep a copy while we wait.
            self._rx_queue.append((bytes(header), [bytes(p) for p in parts], length))
            if len(self._rx_queue) > self.queued_high_water:
                self.queued_high_water = len(self._rx_queue)

    def _send_finished(self, dev, frame, header):
        """The guest lacks an offload this frame uses: finish it here."""
        try:
            finished = softoffload.finish(frame, header, csum=dev.has(NET_F_GUEST_CSUM),
                                          tso4=dev.has(NET_F_GUEST_TSO4),
                                          tso6=dev.has(NET_F_GUEST_TSO6))
        except (MalformedFrame, softoffload.OffloadError) as e:
            self._count_drop(getattr(e, "reason", "offload-error"))
            return
        self.soft_offloaded += 1
        for f, h in finished:
            self.send_frame(f, h)

    def _put(self, dev, header, parts, length):
        """Into the guest's RX buffers now; False when it has none free.

        While frames wait, the guest is asked to kick when it posts buffers;
        otherwise not (``set_no_notify``), which saves a wakeup per refill.
        """
        vq = dev.queue(RX)
        mergeable = dev.has(NET_F_MRG_RXBUF)
        try:
            done = put_frame(vq, header, parts, length, mergeable)
            if not done:
                vq.set_no_notify(False)
                _barrier()  # the flag is visible before we look at avail.idx again
                done = put_frame(vq, header, parts, length, mergeable)
        except FrameTooBig:
            self._count_drop("rx-buffer-too-small")
            return True
        except VirtqueueError as e:
            self._device_failed(dev, e)
            return True
        if done:
            self.frames_out += 1
            self.bytes_out += length
            dev.used(RX)
        elif self._rx_retry is None:
            # A lost kick must not strand the queue: look again soon.
            self._rx_retry = self._reactor.callLater(RX_RETRY, self._rx_retry_due, dev)
        return done

    def _rx_retry_due(self, dev):
        self._rx_retry = None
        if self.device is dev:
            self._rx_ready(dev)

    def _count_drop(self, reason):
        if not self.drops[reason]:
            self.log.warn("guest link {link}: dropping frames ({reason})",
                          link=self.description, reason=reason)
        self.drops[reason] += 1

    # -- the device's callbacks

    def _rx_ready(self, dev):
        queue = self._rx_queue
        while queue and self.device is dev and dev.queue(RX) is not None:
            header, parts, length = queue[0]
            if not self._put(dev, header, parts, length):
                return
            queue.popleft()
        vq = dev.queue(RX)
        if vq is not None and self.device is dev:
            vq.set_no_notify(True)  # nothing waits: no kicks needed

    def _tx_ready(self, dev):
        self._tx_again = None
        vq = dev.queue(TX)
        if vq is None or self.device is not dev:
            return
        hdr_len = dev.header_len
        limit = (MAX_TSO_FRAME if dev.has(NET_F_HOST_TSO4) or dev.has(NET_F_HOST_TSO6)
                 else self.max_frame)
        frames = []
        taken = 0
        try:
            for _ in range(self.read_budget):
                got = take_frame(vq, hdr_len, limit)
                if got is None:
                    break
                taken += 1
                header, frame = got
                if header is None:
                    self._count_drop(frame)
                    continue
                try:
                    vnet.parse(header, len(frame))
                except MalformedFrame as e:
                    self._count_drop(e.reason)
                    continue
                frames.append(frame)
            else:
                # Budget spent: the rest after other readers had their turn.
                self._tx_again = self._reactor.callLater(0, self._tx_ready, dev)
        except VirtqueueError as e:
            self._device_failed(dev, e)
            return
        if taken:
            dev.used(TX)
        deliver(self, frames)

    def _features_changed(self, dev):
        self.log.info("guest link {link}: features negotiated ({features:#x}): checksum "
                      "offload {csum}, TSO4 {gso}, TSO6 {gso6}, mergeable buffers {mrg}",
                      link=self.description, features=dev.features,
                      csum=dev.has(NET_F_GUEST_CSUM), gso=dev.has(NET_F_GUEST_TSO4),
                      gso6=dev.has(NET_F_GUEST_TSO6),
                      mrg=dev.has(NET_F_MRG_RXBUF))

    def _device_failed(self, dev, error):
        conn = self._conn
        if conn is not None and conn.device is dev:
            self._connection_gone(conn, error)

    # -- the listening socket (IReadDescriptor)

    refused_text = "another front-end"

    def logPrefix(self):
        return "arcbox-vhost-user"

    def _serving(self):
        return self._conn is not None

    def _accepted(self, sock):
        self._conn = _Connection(sock, self, self._reactor)
        self._conn.start()
        self.log.info("guest link {link}: front-end connected (a fresh device)",
                      link=self.description)

    def _connection_gone(self, conn, error):
        if conn is not self._conn:
            return
        if error is None:
            self.log.info("guest link {link}: front-end disconnected; waiting for the next "
                          "one", link=self.description)
        else:
            self.devices_broken += 1
            self.drops["device-broken"] += 1
            self.log.error("guest link {link}: device broken, closing the front-end's "
                           "connection: {error}; waiting for the next one",
                           link=self.description, error=describe_error(error))
        self._drop_connection()

    def _drop_connection(self):
        conn, self._conn = self._conn, None
        if self._rx_queue:
            self.drops["no-peer"] += len(self._rx_queue)
            self._rx_queue.clear()
        for call in (self._tx_again, self._rx_retry):
            if call is not None and call.active():
                call.cancel()
        self._tx_again = self._rx_retry = None
        if conn is not None:
            conn.close()
