"""A real Linux VM on ``--vhost-user``: QEMU's virtio-net datapath in the stack.

The guest (tests/vmguest.py's image) runs the same checks as on every other
transport (test_vm_guest.py's FULL: DHCP, ping of the gateway, local DNS
names, 16 MB down and up by sha256, iperf3 each way, a port forward into the
guest's httpd), here with its RAM in a shared memfd so the stack reads and
writes the virtqueues itself. Before it, a broken front-end (a message of
the wrong size) is closed with one log line. Then a second guest reboots (``reboot -f``,
QEMU without ``-no-reboot``) and leases again on the same connection, its
QEMU is SIGKILLed, and a third connects to the same socket: each QEMU gets a fresh
device, the stack stays up. The stack runs with ``--deny 0.0.0.0/0 --allow 127.0.0.0/8``.

Figures (MB/s and the stack's CPU seconds per GB, utime+stime from
/proc/PID/stat) are printed as ``VM_STATS`` lines, never asserted.
"""

import os
import socket
import struct
import time

import pytest

import vmguest

from .test_vm_guest import (LEASE_AND_PING, Marks, blob, free_port, full_run,  # noqa: F401
                            host_sink, iperf_server, marks, report, sink, stack_args, vm_image,
                            wait_for_log, web)

NETDEV = "vhost-user,id=n0,chardev=c0"


class VhostUserVM(vmguest.VirtualMachine):
    """A VM whose RAM is a shared memfd and whose NIC is a vhost-user socket."""

    def __init__(self, *args, socket_path, reboot=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.reboot = reboot
        self.socket_path = str(socket_path)

    def command(self):
        cmd = super().command()
        # QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers when a
        # vhost-user device starts (no irqfd without KVM): legacy INTx instead.
        cmd = [a.replace("virtio-net-pci,netdev=n0,", "virtio-net-pci,netdev=n0,vectors=0,")
               if a.startswith("virtio-net-pci") and os.environ.get("ARCBOX_VM_KVM") != "1"
               else a for a in cmd]
        if self.reboot:  # a guest that reboots stays in the same QEMU
            cmd.remove("-no-reboot")
        at = cmd.index("-netdev")
        return [*cmd[:at],
                "-object", f"memory-backend-memfd,id=mem0,size={self.memory}M,share=on",
                "-machine", "memory-backend=mem0",
                "-chardev", f"socket,id=c0,path={self.socket_path}",
                *cmd[at:]]


@pytest.fixture
def vhost_vms(vm_image, tmp_path):
    """Start vhost-user VMs on the socket given; every one is killed at teardown."""
    started = []

    def start(netdev, script, socket_path=None, **kwargs):
        vm = VhostUserVM(vm_image, netdev, tmp_path, script, name=f"vm{len(started)}",
                         socket_path=socket_path, **kwargs)
        started.append(vm)
        return vm.start()

    try:
        yield start
    finally:
        for vm in started:
            vm.kill()


LEASE_PING_REBOOT = LEASE_AND_PING + """
echo "MARK leased"
sleep 1
reboot -f
"""


def check_lease_and_ping(results, vm, ip):
    assert results["udhcpc"] == "0", vm.console()
    assert results["lease_ip"] == ip
    assert results["lease_router"] == "10.0.2.1"
    assert "3 packets transmitted, 3 packets received" in results["ping"], vm.console()


def full_run_past_a_stall(stack, vms, web, sink, marks, blob, fwd, iperf_port, capsys):
    """full_run, once more with a fresh VM if the first guest stalls.

    Known open bug (issue 15, user guide "Known issue"): under TCG about one
    run in fifteen the guest stops moving data (once a soft lockup in its
    iperf3; other times an iperf3 run that moves 0 bytes) while the stack
    sits idle and healthy. The stall is reported, the
    stack must have stayed up, and the second run must pass every check.
    Any other failure fails at once. Returns (figures, stalls).
    """
    started = []

    def recording(*args, **kwargs):
        vm = vms(*args, **kwargs)
        started.append(vm)
        return vm

    try:
        return full_run(stack, recording, NETDEV, web, sink, marks, blob, fwd, iperf_port), 0
    except AssertionError as e:
        # The stall's two faces: the guest never reaches the end of its script,
        # or an iperf3 run in it moves nothing at all.
        stalled = any(sign in str(e) for sign in ("no 'MARK serving'", "iperf3 moved nothing",
                                                  "0.00 Bytes  0.00 Mbits/sec"))
        if not stalled or not started:
            raise
        with capsys.disabled():
            print(f"\nVHOST_USER_STALL (known issue 15): {str(e).splitlines()[0]}")
    assert stack.proc.poll() is None, stack.log()
    started[-1].kill()
    wait_for_log(stack, "front-end disconnected", timeout=10)
    fresh_marks = Marks()
    fresh_sink = host_sink(fresh_marks)
    try:
        return full_run(stack, vms, NETDEV, web, fresh_sink, fresh_marks, blob, fwd,
                        iperf_port), 1
    finally:
        fresh_sink.close()


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_vm_on_vhost_user(vhost_vms, stack_factory, web, sink, marks, blob, iperf_server,
                          tmp_path, capsys, mtu):
    sock = tmp_path / "vhost.sock"
    fwd = free_port()
    stack = stack_factory("--vhost-user", str(sock), "--mtu", str(mtu), *stack_args(fwd))
    assert sock.stat().st_mode & 0o777 == 0o600

    def vms(netdev, script, **kwargs):
        return vhost_vms(netdev, script, socket_path=sock, **kwargs)

    # A broken front-end first: a message of the wrong size closes its
    # connection (one log line) and the stack serves the QEMUs that follow.
    with socket.socket(socket.AF_UNIX) as bad:
        bad.settimeout(10)
        bad.connect(str(sock))
        bad.sendall(struct.pack("<III", 8, 1, 3) + b"\0\0\0")  # SET_VRING_NUM of 3 bytes
        assert bad.recv(1) == b""
    wait_for_log(stack, "device broken")

    stats, stalls = full_run_past_a_stall(stack, vms, web, sink, marks, blob, fwd,
                                          iperf_server, capsys)
    wait_for_log(stack, "front-end disconnected")
    log = stack.log()
    assert "checksum offload True, TSO4 True" in log, log

    # A guest that reboots (every boot leases, pings and reboots): its driver
    # sets the device up again on the same connection, and the next boot leases.
    killed = vms(NETDEV, LEASE_PING_REBOOT, mac="52:54:00:19:00:02", reboot=True)
    killed.wait_for("MARK leased", timeout=120)
    check_lease_and_ping(killed.results(), killed, "10.0.2.3")
    deadline = time.monotonic() + 120
    while killed.console().count("MARK leased") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert killed.console().count("MARK leased") >= 2, killed.console()
    check_lease_and_ping(killed.results(), killed, "10.0.2.3")
    # Then the QEMU is killed and a new one connects to the same socket.
    killed.kill()
    wait_for_log(stack, "front-end disconnected", timeout=10)
    again = vms(NETDEV, LEASE_AND_PING, mac="52:54:00:19:00:03")
    assert again.wait_exit(120) == 0
    check_lease_and_ping(again.results(), again, "10.0.2.4")
    assert stack.proc.poll() is None, stack.log()
    log = stack.log()
    assert log.count("front-end connected (a fresh device)") == 4 + stalls
    assert log.count("features negotiated") >= 4  # the rebooted guest negotiated again
    assert "Traceback" not in log and log.count("device broken") == 1, log
    report(f"vhost-user mtu {mtu}", stats, capsys)
