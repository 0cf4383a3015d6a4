"""Guest-side TCP client for real-guest tests; run inside the namespace.

Prints one JSON object with what it saw. Modes:
  send HOST PORT NBYTES SEED   send NBYTES of seeded data, shut down the write side,
                               read the reply to EOF
  recv HOST PORT               read to EOF (sha256 and length)
  connect HOST PORT            try to connect; report the error and the time it took
  many HOST PORT N SIZE        N concurrent connections each echo SIZE bytes
  reset HOST PORT              send a little, then reset (SO_LINGER 0 close)
  readerr HOST PORT            read until EOF or error; report which
  halfclose-reply HOST PORT    read to EOF, then send back b"got:<sha256>" and close
  eof-then-linger HOST PORT S  read to EOF, stay silent S seconds (no FIN), then send
  flood HOST PORT N S          N connects at once; after S seconds count refused/pending/connected
  slowrecv HOST PORT NBYTES    read NBYTES slowly (64 KiB every 10 ms)
"""

import asyncio
import hashlib
import json
import random
import socket
import struct
import sys
import time


def data_chunks(total, seed, chunk=1 << 20):
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield rng.randbytes(n)
        sent += n


def read_all(sock):
    h = hashlib.sha256()
    n = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return h.hexdigest(), n
        h.update(data)
        n += len(data)


def main(mode, host, port, *args):
    port = int(port)
    out = {}
    if mode == "send":
        total, seed = int(args[0]), int(args[1])
        s = socket.create_connection((host, port), timeout=60)
        h = hashlib.sha256()
        for chunk in data_chunks(total, seed):
            h.update(chunk)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            reply += data
        out = {"sent_sha256": h.hexdigest(), "reply": reply.decode()}
    elif mode == "recv":
        s = socket.create_connection((host, port), timeout=60)
        sha, n = read_all(s)
        out = {"sha256": sha, "bytes": n}
    elif mode == "connect":
        start = time.monotonic()
        try:
            socket.create_connection((host, port), timeout=30).close()
            out = {"error": None}
        except OSError as e:
            out = {"error": type(e).__name__, "errno": e.errno}
        out["seconds"] = time.monotonic() - start
    elif mode == "many":
        n, size = int(args[0]), int(args[1])
        out = asyncio.run(many(host, port, n, size))
    elif mode == "reset":
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(b"x" * 1000)
        time.sleep(0.3)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        out = {"reset": True}
    elif mode == "readerr":
        s = socket.create_connection((host, port), timeout=30)
        n = 0
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    out = {"result": "eof", "bytes": n}
                    break
                n += len(data)
        except OSError as e:
            out = {"result": type(e).__name__, "bytes": n}
    elif mode == "eof-then-linger":
        # Read to EOF, keep the socket open SECONDS without a word (no FIN),
        # then send: what the peer did meanwhile shows as the error, if any.
        seconds = float(args[0])
        s = socket.create_connection((host, port), timeout=30)
        sha, n = read_all(s)
        time.sleep(seconds)
        out = {"result": "sent", "bytes": n}
        for attempt in (1, 2):  # the second meets a reset the first one drew
            try:
                s.sendall(b"late")
            except OSError as e:
                out = {"result": type(e).__name__, "bytes": n, "attempt": attempt}
                break
            time.sleep(0.5)
    elif mode == "flood":
        # N connects at once, none completed by us; after SECONDS, how each
        # one stands: refused (an RST), still pending, or connected.
        count, seconds = int(args[0]), float(args[1])
        socks = []
        for _ in range(count):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((host, port))
            socks.append(c)
        time.sleep(seconds)
        tally = {"refused": 0, "pending": 0, "connected": 0, "other": 0}
        for c in socks:
            err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 111:
                tally["refused"] += 1
            elif err:
                tally["other"] += 1
            else:
                try:
                    c.getpeername()
                    tally["connected"] += 1
                except OSError:
                    tally["pending"] += 1
            c.close()
        out = tally
    elif mode == "halfclose-reply":
        s = socket.create_connection((host, port), timeout=60)
        sha, n = read_all(s)
        s.sendall(f"got:{sha}:{n}".encode())
        s.close()
        out = {"sha256": sha, "bytes": n}
    elif mode == "slowrecv":
        total = int(args[0])
        s = socket.create_connection((host, port), timeout=120)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        h = hashlib.sha256()
        n = 0
        while n < total:
            data = s.recv(65536)
            if not data:
                break
            h.update(data)
            n += len(data)
            time.sleep(0.01)
        out = {"sha256": h.hexdigest(), "bytes": n}
    print(json.dumps(out))


async def many(host, port, n, size):
    async def one(i):
        payload = random.Random(i).randbytes(size)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(size)
        writer.close()
        await writer.wait_closed()
        return got == payload
    # Open all connections first (concurrently), as the test asks for concurrency.
    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    ok = sum(1 for r in results if r is True)
    errors = sorted({type(r).__name__ for r in results if isinstance(r, BaseException)})
    return {"ok": ok, "errors": errors}


if __name__ == "__main__":
    main(*sys.argv[1:])
