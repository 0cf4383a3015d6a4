"""Guest-side TCP/UDP server for real-guest tests; run inside the namespace.

  sink PORT                 read to EOF, reply "<sha256>:<n>", close
  source PORT NBYTES SEED   send NBYTES of seeded data (tcpclient.data_chunks), close
  latesource PORT DELAY NBYTES SEED   as source, after DELAY seconds of silence
  peer PORT                 reply "<peer ip>:<peer port>", close
  udpecho PORT              echo UDP datagrams back to their sender
Prints "ready" once listening. Listens on both families (one dual-stack socket
on ``::``); an IPv4 peer is reported as its IPv4 address, not ``::ffff:a.b.c.d``.
"""

import hashlib
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tcpclient import data_chunks  # noqa: E402


def handle(mode, conn, peer, args):
    with conn:
        if mode == "sink":
            h = hashlib.sha256()
            n = 0
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                h.update(data)
                n += len(data)
            conn.sendall(f"{h.hexdigest()}:{n}".encode())
        elif mode in ("source", "latesource"):
            if mode == "latesource":
                time.sleep(float(args[0]))
                args = args[1:]
            for chunk in data_chunks(int(args[0]), int(args[1])):
                conn.sendall(chunk)
        elif mode == "peer":
            conn.sendall(f"{peer[0].removeprefix('::ffff:')}:{peer[1]}".encode())


def dual_stack(kind, port):
    """A socket bound to ``port`` on every IPv4 and IPv6 address (IPv4 only without IPv6)."""
    try:
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", port)
    except OSError:
        s = socket.socket(socket.AF_INET, kind)
        address = ("0.0.0.0", port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(address)
    return s


def main(mode, port, *args):
    port = int(port)
    if mode == "udpecho":
        s = dual_stack(socket.SOCK_DGRAM, port)
        print("ready", flush=True)
        while True:
            data, addr = s.recvfrom(65535)
            s.sendto(data, addr)
    s = dual_stack(socket.SOCK_STREAM, port)
    s.listen(128)
    print("ready", flush=True)
    while True:
        conn, peer = s.accept()
        threading.Thread(target=handle, args=(mode, conn, peer, args), daemon=True).start()


if __name__ == "__main__":
    main(*sys.argv[1:])
