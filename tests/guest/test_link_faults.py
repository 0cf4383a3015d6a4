"""A real guest behind a TAP whose kernel refuses some of our frames (ENOBUFS).

The stack runs in-process so that the TAP writes can be made to fail; the
guest is a namespace's own TCP stack, its peer a loopback server.
"""

import errno
import functools

import pytest_twisted
from twisted.internet import threads

from conftest import guest_tcp_client
from hostside import HostServer, sender

from tcpclient import data_chunks  # noqa: E402


guest_client = functools.partial(guest_tcp_client, timeout=120)


@pytest_twisted.inlineCallbacks
def test_a_download_survives_frames_the_kernel_refuses(netns):
    """Every 40th data frame is refused until the link gives it up: the
    connection still delivers every byte (TCP resends), and the link stays up."""
    from twisted.internet import reactor
    from arcbox_net import NetworkStack, StackConfig
    from arcbox_net.link import open_link

    config = StackConfig(deny=("0.0.0.0/0",), allow=("127.0.0.0/8",))
    link = open_link(config, netns=netns, tap_name="tap0", configure=True, reactor=reactor)
    write = link._write
    seen = {"big": 0, "refused": 0}
    doomed = set()

    def refusing_write(frame):
        # A retry is the same frame (its headers carry the IP ident); a TCP
        # resend of the same data is a new frame with a new ident.
        key = bytes(frame[1]) if isinstance(frame, list) and len(frame) > 2 else None
        if key is not None and key not in doomed:
            seen["big"] += 1
            if seen["big"] % 40 == 0:
                doomed.add(key)
        if key in doomed:
            seen["refused"] += 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        write(frame)

    link._write = refusing_write
    stack = NetworkStack(link, config, reactor=reactor)
    stack.startService()
    total = 8 << 20
    server = HostServer(sender(lambda: data_chunks(total, 7)))
    try:
        got = yield threads.deferToThread(guest_client, netns, "recv", "10.0.2.1", server.port)
        yield threads.deferToThread(server.wait)
        assert not server.errors
        expected = server.results[0]
        assert got["bytes"] == total
        assert got["sha256"] == expected
        assert link.drops["no-buffer-space"] >= 2 and seen["refused"] >= 4
        assert not link._stopped and stack.stats()["drops"]["no-buffer-space"] >= 2
    finally:
        server.close()
        stack.stopService()
