"""Host-side peers for real-guest tests: small servers on loopback, in threads.

The stack under test runs as its own process, so blocking threads here are fine.
"""

import hashlib
import socket
import struct
import threading


class HostServer:
    """Accepts on ``host``:ephemeral (IPv4, or IPv6 such as ``::1``) and runs
    ``handler(conn)`` per connection in a thread."""

    def __init__(self, handler, host="127.0.0.1", backlog=1024):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.results = []
        self.errors = []
        self._threads = []
        self._closed = False
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, conn):
        try:
            with conn:
                self.results.append(self.handler(conn))
        except Exception as e:  # recorded for the test to assert on
            self.errors.append(e)

    def wait(self, count=1, timeout=120):
        import time
        deadline = time.monotonic() + timeout
        while len(self.results) + len(self.errors) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self):
        self._closed = True
        self.sock.close()


def sink_then_reply(conn):
    """Read to EOF, reply with the sha256 and length, close."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        h.update(data)
        n += len(data)
    conn.sendall(f"{h.hexdigest()}:{n}".encode())
    return h.hexdigest(), n


def echo(conn):
    n = 0
    while True:
        data = conn.recv(65536)
        if not data:
            return n
        conn.sendall(data)
        n += len(data)


def reset(conn):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def sender(chunks):
    """A handler sending the given chunks then closing (FIN)."""
    def handle(conn):
        h = hashlib.sha256()
        for chunk in chunks():
            h.update(chunk)
            conn.sendall(chunk)
        return h.hexdigest()
    return handle
