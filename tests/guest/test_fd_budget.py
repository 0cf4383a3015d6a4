"""Descriptor exhaustion (issue 20 item 3): a guest that opens more
connections than the process may hold descriptors for gets RSTs beyond the
budget, and the stack's own services keep working: the control API, DNS
over TCP and a port forward's listener, all on the reserve.

The stack runs under ``prlimit --nofile=256:256`` (its soft limit cannot be
raised past the hard one), so the budget is about 256 - what is open at
start - the 64 reserved."""

import json
import socket
import subprocess
import sys
import textwrap
import threading

from conftest import in_ns

from .test_forward_api import api, fetch, free_port

SAFE = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8"]
#: Opens N connections to the gateway and holds them; prints how many
#: succeeded and how many were reset or refused.
HOLDER = textwrap.dedent("""
    import json, socket, sys, time
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    held, refused = [], 0
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect((host, port))
            held.append(s)
        except OSError:
            refused += 1
            s.close()
    print(json.dumps({"held": len(held), "refused": refused}), flush=True)
    sys.stdin.read()
""")


class HoldingServer:
    """Accepts and keeps every connection (a host service the guest floods)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_the_guest_cannot_take_the_descriptors_the_stack_needs(netns, stack_factory, tmp_path):
    server = HoldingServer()
    api_sock = tmp_path / "api.sock"
    forward_port = free_port()
    stack_factory("--netns", netns, "--configure", *SAFE, "--api", str(api_sock),
                  "--dns-record", "budget.test=10.0.2.77", "--dns-upstream", "127.0.0.1:9",
                  "--forward", f"tcp:{forward_port}:8000",
                  prefix=["prlimit", "--nofile=256:256"])
    code, stats = api(api_sock, "GET", "/stats")
    capacity = stats["fds"]["capacity"]
    assert code == 200 and 0 < capacity < 256 - 64
    holder = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", HOLDER,
                               "10.0.2.1", str(server.port), str(capacity + 40)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    guest_srv = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c",
                                  "import socket\ns=socket.create_server(('0.0.0.0',8000))\n"
                                  "print('ready',flush=True)\n"
                                  "while True:\n c,_=s.accept(); c.sendall(b'guest ok'); c.close()"],
                                 stdout=subprocess.PIPE, text=True)
    try:
        assert guest_srv.stdout.readline().strip() == "ready"
        result = json.loads(holder.stdout.readline())
        # Every connection the budget allows was made; the rest were reset at once.
        assert result["held"] + result["refused"] == capacity + 40
        assert capacity - 2 <= result["held"] <= capacity
        code, stats = api(api_sock, "GET", "/stats")
        assert code == 200, "the control API answers with the guest at its limit"
        assert stats["drops"]["tcp-fd-exhausted"] >= 38
        assert stats["fds"]["in_use"] >= result["held"]
        # DNS over TCP (the stack's own listener) and a port forward still work.
        answer = in_ns(netns, "dig", "@10.0.2.1", "+tcp", "+short", "+tries=1", "+time=5",
                       "budget.test").stdout.split()
        assert answer == ["10.0.2.77"]
        assert fetch(forward_port) == b"guest ok"
    finally:
        holder.kill()
        guest_srv.kill()
        holder.wait(10)
        guest_srv.wait(10)
        server.close()
