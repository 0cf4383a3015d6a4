"""The benchmark's own small client/server, the same program for every stack.

Standard library only: it runs inside guest namespaces as well as on the host.
Clients print one JSON object on stdout.

  server HOST PORT               TCP and UDP echo on HOST:PORT (0: any free port);
                                 prints the port, then serves until killed
  probe HOST PORT SECONDS        retry a TCP echo until it works (exit 0) or time is up
  udpprobe HOST PORT             does one UDP datagram come back? (exit 0 / 1)
  rr HOST PORT SECONDS           1-byte ping-pong over one connection: round-trip times
  connrate HOST PORT SECONDS     connect, 1 request, close, one after another: conns/s
  scale HOST PORT N              open N connections and hold them; print {"phase":"open"...};
                                 on a line from stdin, every connection echoes 1 KB
  dns SERVER NAME SECONDS        A queries for NAME, a window of 8 in flight: queries/s
"""

import asyncio
import json
import os
import random
import resource
import socket
import struct
import sys
import time


def emit(obj):
    print(json.dumps(obj), flush=True)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- server

class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def echo(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve(host, port):
    raise_nofile()
    server = await asyncio.start_server(echo, host, port, backlog=4096, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    await asyncio.get_running_loop().create_datagram_endpoint(UdpEcho, local_addr=(host, port))
    print(port, flush=True)
    async with server:
        await server.serve_forever()


# -- simple clients

def probe(host, port, seconds):
    deadline = time.monotonic() + seconds
    error = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.sendall(b"?")
                if s.recv(1) == b"?":
                    return 0
        except OSError as e:
            error = e
        time.sleep(0.2)
    print(f"no TCP echo from {host}:{port}: {error}", file=sys.stderr)
    return 1


def udpprobe(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        for _ in range(3):
            s.sendto(b"probe", (host, port))
            try:
                if s.recv(64) == b"probe":
                    return 0
            except OSError:
                pass
    print(f"no UDP echo from {host}:{port} within 3 s", file=sys.stderr)
    return 1


def percentiles(samples):
    """p0..p100 (101 values) of the samples."""
    s = sorted(samples)
    return [s[min(len(s) - 1, round(i / 100 * (len(s) - 1)))] for i in range(101)]


def rr(host, port, seconds):
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clock = time.perf_counter_ns
    samples = []
    for _ in range(50):                      # warm up
        s.sendall(b"x")
        s.recv(1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = clock()
        s.sendall(b"x")
        if not s.recv(1):
            raise SystemExit("connection closed")
        samples.append((clock() - t0) / 1000)
    s.close()
    p = percentiles(samples)
    return {"count": len(samples), "median_us": p[50], "p99_us": p[99],
            "percentiles_us": [round(v, 1) for v in p]}


def connrate(host, port, seconds):
    ok = failed = 0
    errors = set()
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"r")
                if s.recv(1) == b"r":
                    ok += 1
                else:
                    failed += 1
        except OSError as e:
            failed += 1
            errors.add(type(e).__name__)
    elapsed = time.monotonic() - start
    return {"ok": ok, "failed": failed, "per_second": ok / elapsed, "errors": sorted(errors)}


# -- scale: N idle connections, then all echo 1 KB

async def scale(host, port, n):
    raise_nofile()
    gate = asyncio.Semaphore(256)            # connects in flight at once
    payload = os.urandom(1024)
    errors = set()

    async def open_one():
        async with gate:
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port), 20)
            except (OSError, asyncio.TimeoutError) as e:
                errors.add(type(e).__name__)
                return None

    t0 = time.monotonic()
    conns = [c for c in await asyncio.gather(*(open_one() for _ in range(n))) if c]
    open_seconds = time.monotonic() - t0
    emit({"phase": "open", "open": len(conns), "seconds": open_seconds})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def echo_one(reader, writer):
        try:
            writer.write(payload)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            return got == payload
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            errors.add(type(e).__name__)
            return False

    t1 = time.monotonic()
    results = await asyncio.gather(*(echo_one(r, w) for r, w in conns))
    echo_seconds = time.monotonic() - t1
    for _, writer in conns:
        writer.close()
    return {"phase": "done", "requested": n, "open": len(conns), "ok": sum(results),
            "open_seconds": open_seconds, "echo_seconds": echo_seconds, "errors": sorted(errors)}


# -- DNS: a dnsperf-like loop

def dns_query(qid, name):
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split("."))
    return header + labels + b"\0" + struct.pack("!HH", 1, 1)


def dns(server, name, seconds, window=8):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((server, 53))
    s.settimeout(1.0)
    outstanding = {}
    sent = answered = failed = timeouts = 0
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        while now < end and len(outstanding) < window:
            qid = random.getrandbits(16)
            if qid in outstanding:
                continue
            s.send(dns_query(qid, name))
            outstanding[qid] = now
            sent += 1
        if not outstanding:
            break
        try:
            reply = s.recv(4096)
        except OSError:
            timeouts += len(outstanding)
            outstanding.clear()
            continue
        qid, flags, _qd, ancount = struct.unpack_from("!HHHH", reply)
        if outstanding.pop(qid, None) is None:
            continue
        if flags & 0x000F == 0 and ancount > 0:
            answered += 1
        else:
            failed += 1
    elapsed = time.monotonic() - start
    return {"sent": sent, "answered": answered, "failed": failed, "timeouts": timeouts,
            "per_second": answered / elapsed}


def main(argv):
    mode, *args = argv
    if mode == "server":
        asyncio.run(serve(args[0], int(args[1])))
    elif mode == "probe":
        return probe(args[0], int(args[1]), float(args[2]))
    elif mode == "udpprobe":
        return udpprobe(args[0], int(args[1]))
    elif mode == "rr":
        emit(rr(args[0], int(args[1]), float(args[2])))
    elif mode == "connrate":
        emit(connrate(args[0], int(args[1]), float(args[2])))
    elif mode == "scale":
        emit(asyncio.run(scale(args[0], int(args[1]), int(args[2]))))
    elif mode == "dns":
        emit(dns(args[0], args[1], float(args[2])))
    else:
        raise SystemExit(f"unknown mode {mode!r}\n{__doc__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
