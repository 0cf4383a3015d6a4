"""TCP through a lossy, reordering link: a namespace's own Linux TCP against ours.

The stack runs in-process on a TAP wrapped in ``impairment.ImpairedLink``
(seeded loss, duplication, reordering and delay, both directions), so the
guest's kernel meets the faults of a congested virtual link. Both directions
must deliver every byte, and the stack's recovery (SACK both ways) shows in
its /stats counters.
"""

import functools
import hashlib
import os
import time

import pytest_twisted
from twisted.internet import defer, threads

from conftest import guest_tcp_client
from hostside import HostServer, sender, sink_then_reply
from impairment import Impairment, ImpairedLink

from tcpclient import data_chunks  # noqa: E402

guest_client = functools.partial(guest_tcp_client, timeout=300)
#: Bytes each way; ARCBOX_LOSS_BYTES makes it the issue's 50 MB for a measurement.
TOTAL = int(os.environ.get("ARCBOX_LOSS_BYTES", 8 << 20))


def _impaired_stack(netns, reactor, seed, **faults):
    from arcbox_net import NetworkStack, StackConfig
    from arcbox_net.link import open_link

    config = StackConfig(deny=("0.0.0.0/0",), allow=("127.0.0.0/8",))
    # No offload: every frame is one MTU-sized segment, so a fault hits one
    # segment (as on a real link), not a 64 KiB GSO burst.
    inner = open_link(config, netns=netns, tap_name="tap0", configure=True, reactor=reactor,
                      offload=False)
    link = ImpairedLink(inner, reactor, to_guest=Impairment(seed, **faults),
                        from_guest=Impairment(seed + 1, **faults))
    stack = NetworkStack(link, config, reactor=reactor)
    stack.startService()
    return stack, link


@defer.inlineCallbacks
def _both_ways_byte_exact(netns, down, up):
    """TOTAL bytes from ``down`` to the guest, then TOTAL from the guest to
    ``up``, each checked by sha256; (seconds down, seconds up)."""
    start = time.monotonic()
    got = yield threads.deferToThread(guest_client, netns, "recv", "10.0.2.1", down.port)
    down_s = time.monotonic() - start
    down.wait()
    assert not down.errors
    assert got["bytes"] == TOTAL and got["sha256"] == down.results[0]
    start = time.monotonic()
    sent = yield threads.deferToThread(guest_client, netns, "send", "10.0.2.1", up.port,
                                       TOTAL, 11)
    up_s = time.monotonic() - start
    up.wait()
    assert not up.errors
    expected = hashlib.sha256(b"".join(data_chunks(TOTAL, 11))).hexdigest()
    assert sent["sent_sha256"] == expected
    assert sent["reply"] == f"{expected}:{TOTAL}"
    return down_s, up_s


@pytest_twisted.inlineCallbacks
def test_bulk_both_ways_through_loss_and_reordering(netns):
    """5 % loss, 25 % reordering (the rest 1 ms late), 1 % duplicates, both
    ways: a download and an upload each arrive byte-exact, recovered by SACK
    (the guest's blocks as sender, ours as receiver), and /stats counts it."""
    from twisted.internet import reactor

    stack, link = _impaired_stack(netns, reactor, 20, loss=0.05, duplicate=0.01,
                                  reorder=0.25, delay=0.001)
    down = HostServer(sender(lambda: data_chunks(TOTAL, 7)))
    up = HostServer(sink_then_reply)
    try:
        down_s, up_s = yield _both_ways_byte_exact(netns, down, up)
        faults = link.to_guest.counts + link.from_guest.counts
        assert faults["dropped"] > 100 and faults["reordered"] > 100
        counters = stack.stats()["counters"]
        print(f"\nloss test, {TOTAL} bytes each way: host->guest {down_s:.1f} s, "
              f"guest->host {up_s:.1f} s; faults {dict(faults)}; "
              f"tcp counters { {k: v for k, v in counters.items() if k.startswith('tcp-')} }")
        # Recovery by SACK both ways, counted where /stats shows it.
        assert counters["tcp-ooo-received"] > 0          # we SACKed the guest's data
        assert counters["tcp-fast-recovery"] > 0         # the guest's SACKs drove resends
        assert counters["tcp-retransmits"] > 0
    finally:
        down.close()
        up.close()
        stack.stopService()


@pytest_twisted.inlineCallbacks
def test_bulk_both_ways_with_timestamps_and_no_sack(netns):
    """A guest with SACK off (net.ipv4.tcp_sack=0) but timestamps on, through
    5 % loss and 25 % reordering: both directions arrive byte-exact, the
    stack's RTO estimator takes samples from the guest's echoes of resent
    segments (RFC 7323), and the guest's own RTO sees through its
    retransmissions (50 MB up in 71-84 s through bench.lossy, 299 s without
    our echoes)."""
    import subprocess
    from twisted.internet import reactor

    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w",
                    "net.ipv4.tcp_sack=0", "net.ipv4.tcp_timestamps=1"], check=True)
    stack, link = _impaired_stack(netns, reactor, 21, loss=0.05, reorder=0.25, delay=0.001)
    down = HostServer(sender(lambda: data_chunks(TOTAL, 7)))
    up = HostServer(sink_then_reply)
    try:
        down_s, up_s = yield _both_ways_byte_exact(netns, down, up)
        counters = stack.stats()["counters"]
        print(f"\nno SACK, timestamps, {TOTAL} bytes each way: host->guest {down_s:.1f} s, "
              f"guest->host {up_s:.1f} s; tcp counters "
              f"{ {k: v for k, v in counters.items() if k.startswith('tcp-')} }")
        assert "tcp-dsack-received" not in counters and "tcp-probe" not in counters  # no SACK
        assert counters["tcp-retransmits"] > 0
        assert counters["tcp-rtt-from-timestamps"] > 0  # the guest echoed our TSvals
    finally:
        down.close()
        up.close()
        stack.stopService()


@pytest_twisted.inlineCallbacks
def test_a_guest_that_never_sends_its_fin_is_reset_after_the_fin_timeout(netns):
    """The host closes; the guest reads the EOF but keeps its socket open and
    silent: after --tcp-fin-timeout (1 s here) the stack resets it, frees the
    host socket, and the guest's late write meets the reset."""
    from twisted.internet import reactor
    from arcbox_net import NetworkStack, StackConfig
    from arcbox_net.link import open_link

    config = StackConfig(deny=("0.0.0.0/0",), allow=("127.0.0.0/8",), tcp_fin_timeout=1.0)
    link = open_link(config, netns=netns, tap_name="tap0", configure=True, reactor=reactor)
    stack = NetworkStack(link, config, reactor=reactor)
    stack.startService()
    server = HostServer(sender(lambda: [b"bye"]))
    try:
        got = yield threads.deferToThread(guest_client, netns, "eof-then-linger", "10.0.2.1",
                                          server.port, 3)
        # The reset came before the guest wrote: its first write fails (had the
        # connection still been there, the first would go and draw the host's RST).
        assert got["bytes"] == 3 and got.get("attempt") == 1, got
        assert got["result"] in ("ConnectionResetError", "BrokenPipeError"), got
        assert stack.stats()["counters"]["tcp-idle-timeout"] == 1
        assert stack.tcp.connections == {}
    finally:
        server.close()
        stack.stopService()
