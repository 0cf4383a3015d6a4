"""The TAP's offload request (TUNSETOFFLOAD) and what the link then declares.

No root here, so the kernel's answers are played by a stand-in for
``fcntl.ioctl`` on a pipe's fd; tests/guest/test_ipv6_offload.py checks
what it buys against a real TAP (64 MB each way over IPv6 in GSO frames).
"""

import errno
import os

import pytest
from framebuild import DescriptorReactor

from arcbox_net.config import StackConfig
from arcbox_net.framer import Framer
from arcbox_net.link import tap


class Kernel:
    """Answers TUNSETIFF/TUNSETVNETHDRSZ; refuses TUNSETOFFLOAD flag sets in ``refused``."""

    def __init__(self, refused=()):
        self.refused = set(refused)
        self.asked = []
        self.fds = []

    def open(self, path, flags):
        r, w = os.pipe()
        os.close(w)
        self.fds.append(r)
        return r

    def ioctl(self, fd, request, arg=0):
        if request == tap.TUNSETOFFLOAD:
            self.asked.append(arg)
            if arg in self.refused:
                raise OSError(errno.EINVAL, "Invalid argument")
        return arg


@pytest.fixture
def kernel(monkeypatch):
    k = Kernel()
    monkeypatch.setattr(tap.os, "open", k.open)
    monkeypatch.setattr(tap.fcntl, "ioctl", k.ioctl)
    yield k
    tap.close_all(k.fds)


def _link(fds, offloads):
    return tap.TapLink.from_fds(fds, True, offloads, "tap test", 1500, DescriptorReactor())


def test_csum_tso4_and_tso6_are_asked_for_and_v6_gso_declared(kernel):
    fds, offloads = tap.open_tap("tap9", offload=True)
    assert kernel.asked == [tap.TUN_F_CSUM | tap.TUN_F_TSO4 | tap.TUN_F_TSO6]
    assert offloads == tap.TUN_F_CSUM | tap.TUN_F_TSO4 | tap.TUN_F_TSO6
    caps = _link(fds, offloads).capabilities
    assert (caps.csum_offload, caps.gso_tcpv4, caps.gso_tcpv6) == (True, True, True)
    framer = Framer(StackConfig(), _link(fds, offloads))
    assert framer.tcp_segment_limit6 > 60000 and framer.tcp_segment_limit > 60000


def test_a_kernel_refusing_tso6_keeps_tso4_and_v6_goes_one_mss_per_frame(kernel):
    kernel.refused = {tap.OFFLOAD_CHOICES[0]}
    fds, offloads = tap.open_tap("tap9", offload=True, queues=2)
    assert offloads == tap.TUN_F_CSUM | tap.TUN_F_TSO4
    caps = _link(fds, offloads).capabilities
    assert (caps.csum_offload, caps.gso_tcpv4, caps.gso_tcpv6) == (True, True, False)
    assert Framer(StackConfig(), _link(fds, offloads)).tcp_segment_limit6 is None


def test_a_kernel_refusing_every_offload_leaves_plain_headers(kernel):
    kernel.refused = set(tap.OFFLOAD_CHOICES)
    fds, offloads = tap.open_tap("tap9", offload=True)
    assert kernel.asked == list(tap.OFFLOAD_CHOICES) and offloads == 0
    caps = _link(fds, offloads).capabilities
    assert caps.vnet_header_len == 10
    assert (caps.csum_offload, caps.gso_tcpv4, caps.gso_tcpv6) == (False, False, False)


def test_callers_that_keep_only_on_or_off_get_tso6_with_on(kernel):
    # The namespace helper and queue workers pass a bool across processes.
    fds, _ = tap.open_tap("tap9", offload=True)
    assert _link(fds, True).capabilities.gso_tcpv6
    assert not _link(fds, False).capabilities.gso_tcpv6
    fds, offloads = tap.open_tap("tap9", offload=False)
    assert offloads == 0 and kernel.asked == [tap.OFFLOAD_CHOICES[0]]
