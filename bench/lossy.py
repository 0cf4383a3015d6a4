"""Bulk TCP through a lossy, reordering link: arcbox-net against Linux-to-Linux.

    sudo .venv/bin/python -m bench.lossy [--bytes 50000000] [--loss 0.05] [--reorder 0.25]
                                         [--delay 0.001] [--duplicate 0.0] [--seed 20]
                                         [--guest-sysctl net.ipv4.tcp_sack=0 ...]

Both cases use the same impairment (tests/impairment.py: seeded loss,
duplication, and netem-style reordering, where a frame goes at once with
probability --reorder and --delay late otherwise), once per direction, on
frames of at most the MTU:

- arcbox-net: the stack in this process on a TAP (no offload) into a fresh
  namespace, the impairment between the stack and the TAP; the guest's
  Linux TCP downloads from and uploads to a server on 127.0.0.1.
- Linux-to-Linux: two namespaces, each with a TAP whose other end is this
  process, relaying frames between them through the same impairment.

``--guest-sysctl`` sets a sysctl in the guest's namespace (both namespaces
for Linux-to-Linux), e.g. ``net.ipv4.tcp_sack=0`` for a guest without SACK
that still has timestamps.

Prints the seconds each direction took (byte-exact, checked by sha256) and
the ratio. Root; everything stays in namespaces it creates and removes.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.join(TESTS, "programs"))

from impairment import ImpairedLink, Impairment  # noqa: E402
from tcpclient import data_chunks  # noqa: E402

CLIENT = os.path.join(TESTS, "programs", "tcpclient.py")
SERVER = os.path.join(TESTS, "programs", "tcpserver.py")


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def in_ns(ns, *cmd, timeout=600):
    out = subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True,
                         text=True, timeout=timeout)
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def faults(args, seed):
    return Impairment(seed, loss=args.loss, duplicate=args.duplicate, reorder=args.reorder,
                      delay=args.delay)


def set_sysctls(args, *namespaces):
    for ns in namespaces:
        for setting in args.guest_sysctl:
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting)


def run_reactor_until(reactor, work):
    """Run ``work`` in a thread while the reactor runs here; return its result."""
    box = {}

    def target():
        try:
            box["result"] = work()
        except BaseException as e:  # handed back to the caller
            box["error"] = e
        finally:
            reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(lambda: threading.Thread(target=target, daemon=True).start())
    reactor.run(installSignalHandlers=False)
    if "error" in box:
        raise box["error"]
    return box["result"]


def transfers(client_ns, server_host, serve_down, serve_up, total):
    """(download seconds, upload seconds), both checked byte for byte."""
    port_down, check_down = serve_down()
    start = time.monotonic()
    got = in_ns(client_ns, sys.executable, CLIENT, "recv", server_host, str(port_down))
    down = time.monotonic() - start
    assert got["bytes"] == total and got["sha256"] == check_down(), got
    port_up = serve_up()
    start = time.monotonic()
    sent = in_ns(client_ns, sys.executable, CLIENT, "send", server_host, str(port_up),
                 str(total), "11")
    up = time.monotonic() - start
    expected = hashlib.sha256(b"".join(data_chunks(total, 11))).hexdigest()
    assert sent["reply"] == f"{expected}:{total}", sent
    return down, up


def arcbox(args):
    from twisted.internet import reactor

    from arcbox_net import NetworkStack, StackConfig
    from arcbox_net.link import open_link
    from hostside import HostServer, sender, sink_then_reply

    ns = "arcbox-lossy"
    sh("ip", "netns", "add", ns)
    try:
        set_sysctls(args, ns)
        config = StackConfig(deny=("0.0.0.0/0",), allow=("127.0.0.0/8",))
        inner = open_link(config, netns=ns, tap_name="tap0", configure=True, reactor=reactor,
                          offload=False)
        link = ImpairedLink(inner, reactor, to_guest=faults(args, args.seed),
                            from_guest=faults(args, args.seed + 1))
        stack = NetworkStack(link, config, reactor=reactor)
        stack.startService()
        servers = []

        def serve_down():
            s = HostServer(sender(lambda: data_chunks(args.bytes, 7)))
            servers.append(s)
            return s.port, lambda: (s.wait(), s.results[0])[1]

        def serve_up():
            s = HostServer(sink_then_reply)
            servers.append(s)
            return s.port

        try:
            result = run_reactor_until(reactor, lambda: transfers(
                ns, "10.0.2.1", serve_down, serve_up, args.bytes))
        finally:
            for s in servers:
                s.close()
        stats = stack.stats()
        counters = {k: v for k, v in stats["counters"].items() if k.startswith("tcp-")}
        counters.update({f"drop:{k}": v for k, v in stats["drops"].items()})
        counters.update({f"fault:{k}": v
                         for k, v in (link.to_guest.counts + link.from_guest.counts).items()})
        return result, counters
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def linux(args):
    from twisted.internet import reactor

    from arcbox_net.link.tap import TapLink, open_tap_in_netns

    a, b = "lossy-a", "lossy-b"
    for ns in (a, b):
        sh("ip", "netns", "add", ns)
    try:
        set_sysctls(args, a, b)
        links = {}
        for ns, addr in ((a, "10.77.0.1"), (b, "10.77.0.2")):
            (fd,), _ = open_tap_in_netns(ns, "tap0", configure=dict(address=addr, prefixlen=24))
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            links[ns] = TapLink(fd, f"tap0 in {ns}", reactor=reactor)
        # Frames a sends reach b through one impairment, b's reach a through another.
        to_a = ImpairedLink(links[a], reactor, to_guest=faults(args, args.seed))
        to_b = ImpairedLink(links[b], reactor, to_guest=faults(args, args.seed + 1))

        class Relay:
            def __init__(self, out):
                self.out = out

            def frames_received(self, frames):
                for frame in frames:
                    self.out.send_frame(frame)

            def link_lost(self, reason):
                pass

        links[a].start(Relay(to_b))
        links[b].start(Relay(to_a))
        procs = []

        def serve(mode, *extra):
            p = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, SERVER, mode,
                                  str(port_for[mode]), *extra],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready"

        port_for = {"source": 5001, "sink": 5002}

        def serve_down():
            serve("source", str(args.bytes), "7")
            expected = hashlib.sha256(b"".join(data_chunks(args.bytes, 7))).hexdigest()
            return port_for["source"], lambda: expected

        def serve_up():
            serve("sink")
            return port_for["sink"]

        try:
            return run_reactor_until(reactor, lambda: transfers(
                a, "10.77.0.2", serve_down, serve_up, args.bytes)), {}
        finally:
            for p in procs:
                p.kill()
                p.wait()
            for link in links.values():
                link.stop()
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=50_000_000)
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument("--reorder", type=float, default=0.25)
    parser.add_argument("--delay", type=float, default=0.001)
    parser.add_argument("--duplicate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--guest-sysctl", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the guest's namespace (repeatable)")
    parser.add_argument("--stack", choices=("arcbox-net", "linux"), required=True,
                        help="one per process (each runs the reactor once)")
    args = parser.parse_args()
    (down, up), counters = (arcbox if args.stack == "arcbox-net" else linux)(args)
    print(f"{args.stack}: {args.bytes} bytes, loss {args.loss}, reorder {args.reorder}, "
          f"delay {args.delay}: host->guest {down:.2f} s, guest->host {up:.2f} s")
    if counters:
        print("  counters:", counters)


if __name__ == "__main__":
    main()
