"""``--queues N``: a multi-queue TAP served by worker processes.

Unit tests cover the message framing and which frames a worker keeps; the
real-guest tests run ``twistd arcbox-net --queues 2`` against a namespace's
own TCP stack, with loopback peers.
"""

import functools
import hashlib
import os
import signal
import socket
import threading
import time

import dpkt
import pytest
import pytest_twisted
from conftest import guest_tcp_client, in_ns, udhcpc
from hostside import HostServer, echo
from twisted.internet import threads
from twisted.internet.task import deferLater

from arcbox_net import StackConfig

from .test_forward_api import api, free_port

SAFE = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8"]


from tcpclient import data_chunks  # noqa: E402

guest_client = functools.partial(guest_tcp_client, timeout=120)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def test_guest_connections_spread_over_the_queue_processes(netns, stack_factory, tmp_path):
    """16 concurrent guest connections: each process serves some, and the
    API's stats and the pcap file account for all of them."""
    sock = tmp_path / "api.sock"
    pcap = tmp_path / "all.pcap"
    stack = stack_factory("--netns", netns, "--configure", *SAFE, "--queues", "2",
                          "--api", str(sock), "--pcap", str(pcap))
    server = HostServer(echo)
    try:
        result = guest_client(netns, "many", "10.0.2.1", server.port, 16, 256 * 1024)
        assert result == {"ok": 16, "errors": []}

        def settled():  # a worker reports once a second
            code, stats = api(sock, "GET", "/stats")
            return stats if stats["counters"].get("tcp-closed", 0) >= 16 else None
        stats = wait_for(settled)
        assert stats, api(sock, "GET", "/stats")
        assert stats["counters"]["tcp-opened"] == 16
        queues = stats["queues"]
        assert [q["queue"] for q in queues] == [0, 1]
        assert all(q["frames_in"] > 0 for q in queues), queues
        assert queues[0]["pid"] == stack.proc.pid and queues[1]["pid"] != stack.proc.pid
    finally:
        server.close()
    code, _ = api(sock, "DELETE", "/capture")
    assert code == 200
    syns = set()
    with open(pcap, "rb") as f:
        for _ts, frame in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(frame).data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP):
                seg = ip.data
                if seg.flags & dpkt.tcp.TH_SYN and seg.dport == server.port:
                    syns.add(seg.sport)
    assert len(syns) == 16  # the workers' frames reached the main process's file
    worker = queues[1]["pid"]
    stack.stop()
    assert wait_for(lambda: not _alive(worker), 5), "the worker outlived the stack"


def _alive(pid):
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_forwarded_connections_survive_idling_onto_a_worker_queue(netns, stack_factory,
                                                                  guest_server, tmp_path):
    """The kernel forgets which queue a flow belongs to after ~3 s idle, then
    hashes it: a forwarded connection's next guest data may reach a worker,
    which must hand it to the main process (that holds the connection)."""
    sock = tmp_path / "api.sock"
    host_port = free_port()
    stack_factory("--netns", netns, "--configure", *SAFE, "--queues", "2", "--api", str(sock),
                  "--forward", f"tcp:{host_port}:8000")
    total = 256 * 1024
    guest_server("latesource", 8000, 7, total, 11)
    expected = hashlib.sha256(b"".join(data_chunks(total, 11))).hexdigest()
    results = [None] * 12

    def fetch(i):
        h = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", host_port), timeout=30) as s:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                h.update(data)
        results[i] = h.hexdigest()

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [expected] * 12
    stats = wait_for(lambda: api(sock, "GET", "/stats")[1]["queues"][1].get("relayed"), 3)
    assert stats, "no frame reached the worker's queue: the relay was never exercised"


def test_dhcp_ping_and_dns_work_whichever_queue_they_land_on(netns, stack_factory, tmp_path):
    """A guest that configures itself: DHCP, ping and UDP DNS are the main
    process's; a worker relays them if the kernel hashed them to its queue."""
    sock = tmp_path / "api.sock"
    stack_factory("--netns", netns, *SAFE, "--queues", "2", "--api", str(sock),
                  "--dns-record", "db.test=10.0.2.77", "--dns-upstream", f"127.0.0.1:{free_port()}")
    lease = udhcpc(netns, tmp_path / "lease")
    assert lease["ip"] == "10.0.2.2" and lease["router"] == "10.0.2.1"
    out = in_ns(netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.1").stdout
    assert "3 received" in out
    for port in range(5300, 5316):  # 16 source ports: several hash to each queue
        answer = in_ns(netns, "dig", "+short", "+time=2", "+tries=1", "-b", f"10.0.2.2#{port}",
                       "@10.0.2.1", "db.test").stdout.strip()
        assert answer == "10.0.2.77", port
    # Some of it went to the worker's queue and on to the main process.
    assert wait_for(lambda: api(sock, "GET", "/stats")[1]["queues"][1].get("relayed"), 3)


def test_a_worker_that_dies_ends_the_stack(netns, stack_factory, tmp_path):
    sock = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--configure", *SAFE, "--queues", "2",
                          "--api", str(sock))
    worker = api(sock, "GET", "/stats")[1]["queues"][1]["pid"]
    os.kill(worker, signal.SIGKILL)
    stack.proc.wait(15)
    assert "queue worker 1" in stack.log() and "exited" in stack.log()


def test_workers_leave_with_a_main_process_that_is_killed(netns, stack_factory, tmp_path):
    sock = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--configure", *SAFE, "--queues", "3",
                          "--api", str(sock))
    queues = api(sock, "GET", "/stats")[1]["queues"]
    workers = [q["pid"] for q in queues[1:]]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    stack.proc.kill()
    stack.proc.wait(10)
    assert wait_for(lambda: not any(_alive(pid) for pid in workers), 10), workers


@pytest_twisted.inlineCallbacks
def test_an_embedded_stack_with_queues_reports_every_connection(netns):
    """The embedding API: whenReady() waits for the workers, subscribe() sees
    connections whichever process serves them, stop ends the workers."""
    from twisted.internet import reactor

    from arcbox_net import NetworkStack
    from arcbox_net.link import open_link

    config = StackConfig(deny=("0.0.0.0/0",), allow=("127.0.0.0/8",))
    link = open_link(config, netns=netns, configure=True, queues=2, reactor=reactor)
    assert len(link.extra_queues) == 1
    stack = NetworkStack(link, config, reactor=reactor)
    events = []
    stack.subscribe(lambda kind, details: events.append((kind, details)))
    stack.startService()
    server = HostServer(echo)
    try:
        yield stack.whenReady()
        worker = stack.queue_workers.workers[0]
        result = yield threads.deferToThread(guest_client, netns, "many", "10.0.2.1",
                                             server.port, 16, 64 * 1024)
        assert result == {"ok": 16, "errors": []}
        for _ in range(50):
            if sum(kind == "connection-closed" for kind, _ in events) == 16:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        opened = [d for kind, d in events if kind == "connection-opened"]
        assert len(opened) == 16 and {d["remote"] for d in opened} == {f"10.0.2.1:{server.port}"}
        assert sum(kind == "connection-closed" for kind, _ in events) == 16
        yield deferLater(reactor, 1.5, lambda: None)  # the worker's next report
        stats = stack.stats()
        assert stats["counters"]["tcp-opened"] == 16
        assert stats["queues"][1]["frames_in"] > 0 and stats["queues"][0]["frames_in"] > 0
    finally:
        server.close()
        stack.stopService()
    for _ in range(50):
        if not _alive(worker.pid):
            break
        yield deferLater(reactor, 0.1, lambda: None)
    assert not _alive(worker.pid)


@pytest_twisted.inlineCallbacks
def test_a_worker_that_cannot_start_fails_whenready_and_stops_the_stack(netns, monkeypatch):
    from twisted.internet import reactor

    from arcbox_net import NetworkStack
    from arcbox_net.link import open_link
    from arcbox_net.multiqueue import supervisor

    monkeypatch.setattr(supervisor.sys, "executable", "/bin/false")
    config = StackConfig(deny=("0.0.0.0/0",), allow=("127.0.0.0/8",))
    link = open_link(config, netns=netns, configure=True, queues=2, reactor=reactor)
    stack = NetworkStack(link, config, reactor=reactor)
    lost = stack.whenLinkLost()
    stack.startService()
    try:
        with pytest.raises(RuntimeError, match="queue worker 1 exited before serving"):
            yield stack.whenReady()
        reason = yield lost
        assert "queue worker 1" in str(reason) and not stack.running
    finally:
        if stack.running:
            stack.stopService()
