"""Guest-side TCP/UDP server for real-guest tests; run inside the namespace.

  sink PORT                 read to EOF, reply "<sha256>:<n>", close
  source PORT NBYTES SEED   send NBYTES of seeded data (tcpclient.data_chunks), close
  latesource PORT DELAY NBYTES SEED   as source, after DELAY seconds of silence
  peer PORT                 reply "<peer ip>:<peer port>", close
  udpecho PORT              echo UDP datagrams back to their sender
Prints "ready" once listening.
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
            conn.sendall(f"{peer[0]}:{peer[1]}".encode())


def main(mode, port, *args):
    port = int(port)
    if mode == "udpecho":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        print("ready", flush=True)
        while True:
            data, addr = s.recvfrom(65535)
            s.sendto(data, addr)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    print("ready", flush=True)
    while True:
        conn, peer = s.accept()
        threading.Thread(target=handle, args=(mode, conn, peer, args), daemon=True).start()


if __name__ == "__main__":
    main(*sys.argv[1:])
