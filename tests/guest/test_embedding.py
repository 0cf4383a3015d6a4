"""The embedding API: the documented example run for real, and the API in-process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer

from conftest import udhcpc

from conftest import REPO as ROOT
EXAMPLE = os.path.join(ROOT, "docs", "examples", "embedded_stack.py")


def test_documented_example_runs(netns, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, EXAMPLE, netns, str(port), "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "ready":
                break
        assert lines and lines[-1].strip() == "ready", "".join(lines)
        lease = udhcpc(netns, tmp_path / "lease")
        assert lease["ip"] == "10.0.2.2"
        # Nothing listens on the guest's port 80: the client is reset (so
        # quickly that connect() itself may already report it).
        with pytest.raises(ConnectionResetError):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.recv(10)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(l) for l in (*lines, *out.splitlines()) if l.startswith("{")]
    kinds = [e.get("event") for e in events]
    assert "forward-added" in kinds and "forward-removed" in kinds
    assert {"event": "lease-granted", "mac": events[kinds.index("lease-granted")]["mac"],
            "address": "10.0.2.2",
            "expiry": events[kinds.index("lease-granted")]["expiry"]} in events
    assert "connection-opened" in kinds and "connection-closed" in kinds
    assert "stopped: time is up" in out


@pytest_twisted.inlineCallbacks
def test_forwards_and_events_in_process():
    """add_forward/remove_forward return Deferreds; events reach subscribers."""
    from twisted.internet import reactor
    from arcbox_net import NetworkStack, StackConfig
    from arcbox_net.forward import ForwardError
    from arcbox_net.link.socket import SocketFrameLink

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    stack = NetworkStack(SocketFrameLink(ours), StackConfig(), reactor=reactor)
    seen = []
    unsubscribe = stack.subscribe(lambda kind, details: seen.append((kind, details)))
    stack.startService()
    try:
        forward = yield stack.add_forward("tcp:127.0.0.1:0:8080")
        assert forward["id"] == "1" and forward["guest"] == "10.0.2.2:8080"
        assert stack.forwards() == [forward]
        with pytest.raises(ForwardError) as info:
            yield stack.add_forward("tcp:127.0.0.1:0")
        assert info.value.status == 400
        yield stack.remove_forward(forward["id"])
        assert stack.forwards() == []
        with pytest.raises(ForwardError) as info:
            yield stack.remove_forward(forward["id"])
        assert info.value.status == 404
        assert [k for k, _ in seen] == ["forward-added", "forward-removed"]
        unsubscribe()
        yield stack.add_forward("tcp:127.0.0.1:0:8081")
        assert len(seen) == 2
    finally:
        stack.stopService()
        yield defer.succeed(None)
        theirs.close()
