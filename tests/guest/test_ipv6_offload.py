"""TSO6 on the links that carry virtio-net headers, against a real Linux stack.

A namespace guest over IPv6 (fd00::2, default route via fe80::1) moves 64 MB
each way to a host server on [::1] via fd00::1, at MTU 1500: on the TAP and on
``--fd --vnet-hdr`` (tests/programs/vnet_relay.py, a TAP with IFF_VNET_HDR
behind a socketpair). The data must arrive whole (sha256), and in GSO frames
both ways: far fewer frames than the ~47,000 one-MSS segments each way would
need, i.e. the guest's kernel sends TSO6 frames and takes GSO_TCPV6 ones.
Then a real VM (tests/vmguest.py) on ``--vhost-user`` negotiates HOST_TSO6 and
GUEST_TSO6 and moves 16 MB each way over IPv6 the same way.
"""

import hashlib
import os
import socket
import subprocess
import sys

import pytest
from conftest import GUEST_CLIENT, guest_tcp_client, in_ns
from hostside import HostServer, sender, sink_then_reply
from tcpclient import data_chunks

from .test_forward_api import api
from .test_vm_guest import vm_image  # noqa: F401 (a fixture)

RELAY = os.path.join(os.path.dirname(GUEST_CLIENT), "vnet_relay.py")
SAFE = ("--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8", "--deny", "::/0", "--allow", "::1/128")
SIZE = 64 * 1024 * 1024
#: One-MSS frames for SIZE bytes at MTU 1500 (MSS 1428 with timestamps) are
#: about 47,000 each way; GSO frames of 64 KiB about 1,000.
FEW_FRAMES = 20000


def _v6_up(ns):
    in_ns(ns, "ip", "link", "set", "tap0", "mtu", "1500", "up")
    in_ns(ns, "ip", "addr", "add", "fd00::2/64", "dev", "tap0", "nodad")
    in_ns(ns, "ip", "-6", "route", "replace", "default", "via", "fe80::1", "dev", "tap0")


def _both_ways(ns, api_sock):
    up = HostServer(sink_then_reply, host="::1")
    down = HostServer(sender(lambda: data_chunks(SIZE, 7)), host="::1")
    try:
        out = guest_tcp_client(ns, "send", "fd00::1", up.port, SIZE, 3, timeout=180)
        up.wait()
        assert not up.errors and up.results[0] == (out["sent_sha256"], SIZE)
        code, before = api(api_sock, "GET", "/stats")
        got = guest_tcp_client(ns, "recv", "fd00::1", down.port, timeout=180)
        down.wait()
        assert got["bytes"] == SIZE and got["sha256"] == down.results[0]
    finally:
        up.close()
        down.close()
    code, after = api(api_sock, "GET", "/stats")
    assert code == 200
    # Guest to host: the frames read during the upload (a few hundred more for
    # the download's ACKs, ND and RAs).
    assert before["frames_in"] < FEW_FRAMES, before
    assert after["frames_out"] - before["frames_out"] < FEW_FRAMES, (before, after)
    assert not after["drops"].get("bad-vnet-header"), after


def test_tap_64mb_each_way_over_ipv6_in_gso_frames(netns, stack_factory, tmp_path):
    api_sock = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--api", str(api_sock), *SAFE)
    _v6_up(netns)
    _both_ways(netns, api_sock)
    assert "Traceback" not in stack.log()


@pytest.fixture
def vnet_guest(netns, stack_factory, tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    relay = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, RELAY, "tap0",
                              str(ours.fileno())],
                             pass_fds=(ours.fileno(),), stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout.readline().strip() == "ready"
        ours.close()
        # Up before the stack's first RA: the relay ends on a write to a TAP that is down.
        in_ns(netns, "ip", "link", "set", "tap0", "up")
        api_sock = tmp_path / "api.sock"
        stack = stack_factory("--fd", str(theirs.fileno()), "--vnet-hdr", "--api", str(api_sock),
                              *SAFE, pass_fds=(theirs.fileno(),))
        theirs.close()
        _v6_up(netns)
        yield netns, api_sock, stack
    finally:
        relay.kill()
        relay.wait(10)


def test_fd_vnet_hdr_64mb_each_way_over_ipv6_in_gso_frames(vnet_guest):
    ns, api_sock, stack = vnet_guest
    _both_ways(ns, api_sock)
    assert "Traceback" not in stack.log()


# -- a real VM on --vhost-user: TSO6 negotiated with the guest's virtio-net driver

VM_SIZE = 16 * 1024 * 1024
VM_SCRIPT = """
ip link set eth0 up
ip -6 addr add fd00::2/64 dev eth0 nodad
sleep 2
ip -6 route add default via fe80::1 dev eth0
ping -6 -c 2 -W 3 fd00::1 >/dev/null 2>&1
nc fd00::1 {down} </dev/null >/tmp/down
echo "RESULT down_bytes=$(wc -c < /tmp/down)"
echo "RESULT down_sha256=$(sha256sum /tmp/down | cut -d' ' -f1)"
rm /tmp/down
dd if=/dev/urandom of=/tmp/blob bs=65536 count={blocks} 2>/dev/null
echo "RESULT blob_sha256=$(sha256sum /tmp/blob | cut -d' ' -f1)"
nc fd00::1 {up} -e cat /tmp/blob
echo "RESULT up_exit=$?"
"""


def _sink(conn):
    """Read to EOF; (sha256, length). No reply: ``nc -e`` closes both ways."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            return h.hexdigest(), n
        h.update(data)
        n += len(data)


def test_vm_on_vhost_user_moves_ipv6_tcp_in_tso6_frames(vm_image, stack_factory, tmp_path,
                                                        capsys):
    from .test_vhost_user import VhostUserVM
    sock = tmp_path / "vhost.sock"
    api_sock = tmp_path / "api.sock"
    stack = stack_factory("--vhost-user", str(sock), "--api", str(api_sock), *SAFE)
    down = HostServer(sender(lambda: data_chunks(VM_SIZE, 11)), host="::1")
    up = HostServer(_sink, host="::1")
    try:
        # The known TCG stall of issue 15 (about 1 run in 15): one fresh VM more.
        for attempt in range(2):
            _, before = api(api_sock, "GET", "/stats")
            vm = VhostUserVM(vm_image, "vhost-user,id=n0,chardev=c0", tmp_path,
                             VM_SCRIPT.format(down=down.port, up=up.port,
                                              blocks=VM_SIZE // 65536),
                             socket_path=sock, name=f"vm{attempt}")
            try:
                vm.start()
                try:
                    vm.wait_exit(300)
                except AssertionError as e:
                    if attempt:
                        raise
                    with capsys.disabled():
                        print(f"\nVHOST_USER_STALL (known issue 15): {str(e).splitlines()[0]}")
                    continue
            finally:
                vm.kill()
            break
        results = vm.results()
        _, after = api(api_sock, "GET", "/stats")
        up.wait()
        down.wait()
    finally:
        up.close()
        down.close()
    log = stack.log()
    assert "TSO4 True, TSO6 True" in log, log
    assert results.get("down_bytes") == str(VM_SIZE), vm.console()
    assert results["down_sha256"] == down.results[-1], vm.console()
    assert results.get("up_exit") == "0", vm.console()
    assert up.results[-1] == (results["blob_sha256"], VM_SIZE), vm.console()
    # 16 MB one MSS per frame would be about 11,700 frames each way.
    frames_in = after["frames_in"] - before["frames_in"]
    frames_out = after["frames_out"] - before["frames_out"]
    assert frames_in < 4000 and frames_out < 4000, (frames_in, frames_out)
    assert "Traceback" not in log
