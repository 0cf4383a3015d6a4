"""The soak's traffic: one process per side, every kind of traffic at once.

Standard library only: it runs inside the guest namespace as well as on the
host, as its own process so the sampler in bench/soak.py is never held up.

  soakload.py guest CONFIG_JSON    traffic from the guest (run in its namespace)
  soakload.py host CONFIG_JSON     traffic from the host: forwards and the API
  soakload.py dns PORT             the upstream DNS server (127.0.0.1:PORT)

The load sides run until SIGTERM and print one JSON line of cumulative counts
every ``report`` seconds and a last one when they stop:
``{"t": seconds, "final": bool, "kinds": {kind: {"ok", "fail", "errors"}}}``.
A kind counts ``ok`` for a request that got the answer it should (an echo
byte for byte, the DNS rcode the name calls for, a ping reply) and ``fail``
otherwise; ``sent`` kinds (garbage frames) only count what went out.

Every address is on this machine: the gateway and the mapped address lead to
host loopback, the forwards listen on 127.0.0.1, the upstream DNS server is
on 127.0.0.1 and answers with loopback addresses only.
"""

import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

STOP = threading.Event()
START = time.monotonic()


class Kind:
    """Counts of one kind of traffic (threads add to it, the reporter reads it)."""

    def __init__(self):
        self.ok = 0
        self.fail = 0
        self.errors = Counter()
        self.extra = Counter()
        self.lock = threading.Lock()

    def good(self, n=1, **extra):
        with self.lock:
            self.ok += n
            self.extra.update(extra)

    def bad(self, why):
        with self.lock:
            self.fail += 1
            self.errors[why] += 1

    def snapshot(self):
        with self.lock:
            return {"ok": self.ok, "fail": self.fail, "errors": dict(self.errors),
                    **dict(self.extra)}


KINDS = {}


def kind(name):
    return KINDS.setdefault(name, Kind())


def error_name(e):
    if isinstance(e, str):
        return e
    if isinstance(e, OSError) and e.errno is not None:
        import errno
        return f"{type(e).__name__} {errno.errorcode.get(e.errno, e.errno)}"
    return type(e).__name__


def pause(seconds):
    """Sleep, but wake at once on stop; False when stopping."""
    return not STOP.wait(seconds)


def loop(name, body, gap):
    """Run ``body()`` until stop, ``gap`` seconds apart; exceptions count as failures."""
    k = kind(name)

    def run():
        while not STOP.is_set():
            try:
                body(k)
            except Exception as e:          # every failure is counted, none stops the soak
                k.bad(error_name(e))
            if not pause(gap):
                break
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def recv_exactly(sock, n):
    chunks, got = [], 0
    while got < n:
        data = sock.recv(n - got)
        if not data:
            raise ConnectionError("closed early")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


# -- TCP and UDP echo clients

def short_tcp(k, targets):
    """Connect, one request, read the echo, close: a connection's whole life."""
    host, port = random.choice(targets)
    payload = os.urandom(random.choice((1, 100, 1400, 9000)))
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(payload)
        if recv_exactly(s, len(payload)) != payload:
            raise ValueError("echo differs")
    k.good()


def udp_flow(k, targets):
    """A new flow (fresh source port): three datagrams, each echoed."""
    host, port = random.choice(targets)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for _ in range(3):
            payload = os.urandom(random.choice((1, 64, 512, 1400)))
            s.sendto(payload, (host, port))
            while True:
                data, _ = s.recvfrom(65536)
                if data == payload:
                    break
    k.good()


def iperf_burst(k, state, host, port, seconds, rate):
    """iperf3 for ``seconds``, alternating direction each time (-R: server sends)."""
    state["n"] = state.get("n", 0) + 1
    reverse = state["n"] % 2 == 0
    # setpriv --pdeathsig: iperf3 gets SIGTERM when we die, however we die (the thread-safe
    # way to say so; a preexec_fn in a threaded process can deadlock).
    cmd = ["setpriv", "--pdeathsig", "TERM", "iperf3", "-c", host, "-p", str(port), "-t",
           str(seconds), "-b", rate, "-J", "--connect-timeout", "5000"] + (["-R"] if reverse else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state["proc"] = proc
    try:
        out, _ = proc.communicate(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        k.bad("timeout")
        return
    finally:
        state["proc"] = None
    if STOP.is_set() and proc.returncode != 0:
        return                               # cut short by the stop: neither good nor bad
    try:
        end = json.loads(out)["end"]
        moved = int(end["sum_received"]["bytes"])
    except (ValueError, KeyError, TypeError):
        k.bad(f"iperf3 exit {proc.returncode}")
        return
    if proc.returncode != 0 or moved == 0:
        k.bad(f"iperf3 exit {proc.returncode}")
        return
    k.good(**{"bytes_down" if reverse else "bytes_up": moved})


# -- DNS

def dns_query(qid, labels, qtype=1):
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    name = b"".join(bytes([len(p)]) + p for p in labels) + b"\0"
    return header + name + struct.pack("!HH", qtype, 1)


def dns_case(upstream_zone):
    """(query labels, the rcodes that are right for it); None: no answer is right."""
    r = random.random()
    tag = b"%x" % random.getrandbits(32)
    zone = upstream_zone.encode().split(b".")
    if r < 0.15:
        return [b"host", b"arcbox", b"internal"], {0}                 # local answer
    if r < 0.20:
        return [b"nope" + tag, b"arcbox", b"internal"], {3}            # local NXDOMAIN
    if r < 0.50:
        return [b"ok" + tag, *zone], {0}                               # upstream answer
    if r < 0.65:
        return [b"ok" + tag[:2], *zone], {0}                           # upstream, often cached
    if r < 0.75:
        return [b"nx" + tag, *zone], {3}                               # upstream NXDOMAIN
    if r < 0.80:
        return [b"slow" + tag, *zone], {2}                             # upstream silent: SERVFAIL
    if r < 0.90:
        return [b"x" * 64, *zone], {1}                                 # label over 63: FORMERR
    return [b"y" * 60] * 5, {1}                                        # name over 255: FORMERR


def dns_udp(k, server, zone):
    labels, want = dns_case(zone)
    qid = random.getrandbits(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(6)                       # past the stack's --dns-timeout
        s.sendto(dns_query(qid, labels), (server, 53))
        while True:
            reply, _ = s.recvfrom(65536)
            if struct.unpack_from("!H", reply)[0] == qid:
                break
    rcode = reply[3] & 0x0F
    if rcode in want:
        k.good()
    else:
        k.bad(f"rcode {rcode}, wanted {sorted(want)}")


def dns_tcp(k, server, zone):
    """Two queries on one DNS-over-TCP connection."""
    with socket.create_connection((server, 53), timeout=6) as s:
        for _ in range(2):
            labels, want = dns_case(zone)
            qid = random.getrandbits(16)
            q = dns_query(qid, labels)
            s.sendall(struct.pack("!H", len(q)) + q)
            length = struct.unpack("!H", recv_exactly(s, 2))[0]
            reply = recv_exactly(s, length)
            rcode = reply[3] & 0x0F
            if struct.unpack_from("!H", reply)[0] != qid or rcode not in want:
                raise ValueError(f"rcode {rcode}, wanted {sorted(want)}")
    k.good()


def dns_junk(k, server):
    """Datagrams to port 53 that are no DNS query: the stack must drop or FORMERR them."""
    junk = random.choice([os.urandom(random.randint(1, 40)), b"\0" * 12,
                          dns_query(1, [b"a" * 10])[:-3],         # question cut short
                          struct.pack("!HHHHHH", 7, 0x0100, 9, 0, 0, 0)])   # 9 questions, none there
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(junk, (server, 53))
    k.good()


# -- ICMP

def ping(k, target):
    result = subprocess.run(["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", target],
                            capture_output=True, text=True, timeout=15, check=False)
    if result.returncode == 0:
        k.good()
    else:
        k.bad(f"ping {target} exit {result.returncode}")


# -- garbage frames on the guest's side of the TAP

def inet_sum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac_bytes(text):
    return bytes.fromhex(text.replace(":", ""))


def ipv4(src, dst, proto, payload, ident=None, flags_frag=0, bad_sum=False, ihl=5, total=None):
    ident = random.getrandbits(16) if ident is None else ident
    total = 20 + len(payload) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, ident, flags_frag, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    csum = inet_sum(header)
    if bad_sum:
        csum ^= 0x5A5A
    return header[:10] + struct.pack("!H", csum) + header[12:] + payload


def l4_sum(src, dst, proto, segment):
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto,
                                                                          len(segment))
    return inet_sum(pseudo + segment)


def tcp_segment(src, dst, sport, dport, flags, seq=None, ack=0, payload=b"", bad_sum=False):
    seq = random.getrandbits(32) if seq is None else seq
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
    csum = l4_sum(src, dst, 6, seg)
    if bad_sum:
        csum ^= 0x1234
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def udp_datagram(src, dst, sport, dport, payload, bad_sum=False):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = l4_sum(src, dst, 17, seg) or 0xFFFF
    if bad_sum:
        csum ^= 0x4321
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def dhcp_discover(mac):
    xid = random.getrandbits(32)
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4,
                        b"\0" * 4, b"\0" * 4, b"\0" * 4, mac + b"\0" * 10, b"", b"")
    options = b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\x37\x03\x01\x03\x06" + b"\xff"
    return bootp + options


def garbage_frames(guest_mac, gw_mac, guest_ip, gw_ip, echo_port):
    """One round of bad frames: what a broken or hostile guest puts on the link."""
    g, gw = mac_bytes(guest_mac), mac_bytes(gw_mac)
    rnd_mac = bytes([0x02 | (random.getrandbits(8) & 0xFC)]) + os.urandom(5)

    def eth(dst, src, etype, body):
        return dst + src + struct.pack("!H", etype) + body
    sport = random.randint(20000, 60000)
    frames = [
        eth(gw, g, 0x0800, os.urandom(random.randint(0, 6))),                  # IPv4 shorter than a header
        eth(gw, g, 0x0800, b""),                                               # IPv4, no packet
        eth(gw, g, 0x88B5, os.urandom(46)),                                    # unknown ethertype
        eth(gw, g, random.choice((0x8100, 0x88CC, 0x9000, 0x1234)), os.urandom(random.randint(0, 200))),
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 17, udp_datagram(guest_ip, gw_ip, sport, 53, b"q"),
                                bad_sum=True)),                                # bad IP checksum
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 6, tcp_segment(guest_ip, gw_ip, sport, echo_port,
                                                                0x02, bad_sum=True))),  # bad TCP sum
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 17, udp_datagram(guest_ip, gw_ip, sport, echo_port,
                                                                  b"bad", bad_sum=True))),
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 17, b"\0" * 8, ihl=3)),       # IHL below 5
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 17, b"\0" * 8, total=1400)),  # length past the frame
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 17, os.urandom(600), flags_frag=0x2000)),  # first fragment
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 17, os.urandom(64), flags_frag=0x00B9)),   # last fragment
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 6, tcp_segment(guest_ip, gw_ip, sport, echo_port,
                                                                0x10, ack=1))),  # ACK, no connection
        eth(gw, g, 0x0800, ipv4("10.0.2.99", gw_ip, 6, tcp_segment("10.0.2.99", gw_ip, sport,
                                                                   echo_port, 0x02))),  # spoofed source
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 1, b"\x08\x00\xff\xff" + os.urandom(20))),  # bad ICMP sum
        eth(gw, g, 0x0800, ipv4(guest_ip, gw_ip, 99, os.urandom(30))),         # unknown IP protocol
        eth(gw, g, 0x0806, os.urandom(random.randint(0, 27))),                 # ARP cut short
        eth(gw, g, 0x86DD, os.urandom(random.randint(0, 39))),                 # IPv6 cut short
        eth(gw, rnd_mac, 0x0800, ipv4(guest_ip, gw_ip, 17, os.urandom(40))),   # a stranger's MAC
        os.urandom(random.randint(60, 1514)),                                  # noise
    ]
    return frames


def garbage(k, iface, guest_mac, gw_mac, guest_ip, gw_ip, echo_port, state):
    s = state.get("sock")
    if s is None:
        s = state["sock"] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((iface, 0))
    frames = garbage_frames(guest_mac, gw_mac, guest_ip, gw_ip, echo_port)
    state["round"] = state.get("round", 0) + 1
    if state["round"] % 10 == 0:               # now and then a DISCOVER from a new MAC
        mac = bytes([0x02]) + os.urandom(5)
        frames.append(b"\xff" * 6 + mac + b"\x08\x00" + ipv4(
            "0.0.0.0", "255.255.255.255", 17, udp_datagram("0.0.0.0", "255.255.255.255", 68, 67,
                                                           dhcp_discover(mac))))
    sent = 0
    for frame in frames:
        try:
            s.send(frame)
            sent += 1
        except OSError as e:                   # ENOBUFS on a full queue, EINVAL on a runt
            k.bad(error_name(e))
    k.good(sent)


# -- the control API (host side)

class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("arcbox", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def api_call(path, method, url, body=None):
    conn = UnixHTTPConnection(path)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def api_round(k, api, guest_port, state):
    """The reads a dashboard makes, a forward added and removed, and requests that must be 4xx."""
    for url in ("/stats", "/metrics", "/connections", "/leases", "/forwards", "/capture"):
        status, body = api_call(api, "GET", url)
        if status != 200 or not body:
            raise ValueError(f"GET {url}: {status}")
    state["n"] = state.get("n", 0) + 1
    if state["n"] % 4 == 0:
        status, body = api_call(api, "POST", "/forwards", json.dumps(
            {"protocol": random.choice(("tcp", "udp")), "listen": "127.0.0.1:0",
             "guest": str(guest_port)}))
        if status != 201:
            raise ValueError(f"POST /forwards: {status} {body[:100]!r}")
        fid = json.loads(body)["id"]
        status, _ = api_call(api, "DELETE", f"/forwards/{fid}")
        if status != 204:
            raise ValueError(f"DELETE /forwards/{fid}: {status}")
    bad = random.choice([("GET", "/nowhere", None), ("POST", "/forwards", "{not json"),
                         ("POST", "/forwards", json.dumps({"protocol": "tcp", "listen": "x",
                                                           "guest": "+80"})),
                         ("DELETE", "/forwards/999999", None), ("PUT", "/stats", "{}"),
                         ("POST", "/forwards", "[" * 5000 + "]" * 5000)])
    status, _ = api_call(api, *bad)
    if not 400 <= status < 500:
        raise ValueError(f"{bad[0]} {bad[1]}: {status}, wanted 4xx")
    k.good()


def capture_round(k, api, tmpdir):
    """A one-second capture to a new file, stopped and removed."""
    path = os.path.join(tmpdir, f"cap-{random.getrandbits(32):08x}.pcap")
    status, body = api_call(api, "POST", "/capture", json.dumps({"path": path}))
    if status != 201:
        raise ValueError(f"POST /capture: {status} {body[:100]!r}")
    try:
        pause(1.0)
    finally:
        status, _ = api_call(api, "DELETE", "/capture")
        try:
            os.unlink(path)
        except OSError:
            pass
    if status != 200:
        raise ValueError(f"DELETE /capture: {status}")
    k.good()


# -- the upstream DNS server

def dns_server(port):
    """Answers A queries on 127.0.0.1:PORT: ``nx*`` NXDOMAIN, ``slow*`` never, others
    one A record of 127.0.0.3 (TTL 5, so the stack's cache keeps turning over)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(65536)
        try:
            qid, _flags, qd = struct.unpack_from("!HHH", data)
            i, first = 12, None
            while data[i]:
                if first is None:
                    first = data[i + 1:i + 1 + data[i]]
                i += 1 + data[i]
            question = data[12:i + 5]
        except (struct.error, IndexError):
            continue
        if qd != 1 or first is None or first.startswith(b"slow"):
            continue
        if first.startswith(b"nx"):
            s.sendto(struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + question, addr)
            continue
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton("127.0.0.3")
        s.sendto(struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + answer, addr)


# -- the two sides

def guest_side(cfg):
    gw = cfg["gateway"]
    echo = [(gw, cfg["echo_port"]), (cfg["mapped"], cfg["echo_port"])]
    iface = cfg["iface"]
    with open(f"/sys/class/net/{iface}/address") as f:
        guest_mac = f.read().strip()
    bulk_state, garbage_state = {}, {}
    threads = [
        loop("guest_bulk", lambda k: iperf_burst(k, bulk_state, gw, cfg["iperf_port"],
                                                 cfg["burst"], cfg["rate"]), cfg["burst_gap"]),
        loop("guest_short_tcp", lambda k: short_tcp(k, echo), 0.02),
        loop("guest_short_tcp_2", lambda k: short_tcp(k, echo), 0.05),
        loop("guest_udp_flows", lambda k: udp_flow(k, echo), 0.1),
        loop("dns_udp", lambda k: dns_udp(k, gw, cfg["zone"]), 0.05),
        loop("dns_udp_2", lambda k: dns_udp(k, gw, cfg["zone"]), 0.1),
        loop("dns_tcp", lambda k: dns_tcp(k, gw, cfg["zone"]), 0.5),
        loop("dns_junk", lambda k: dns_junk(k, gw), 0.2),
        loop("ping_gateway", lambda k: ping(k, gw), 1.0),
        loop("ping_mapped", lambda k: ping(k, cfg["mapped"]), 1.0),
        loop("garbage_frames", lambda k: garbage(k, iface, guest_mac, cfg["gateway_mac"],
                                                 cfg["guest_ip"], gw, cfg["echo_port"],
                                                 garbage_state), 0.1),
    ]
    return threads, [bulk_state]


def host_side(cfg):
    fwd = [("127.0.0.1", cfg["forward_port"])]
    bulk_state, api_state = {}, {}
    threads = [
        loop("forward_bulk", lambda k: iperf_burst(k, bulk_state, "127.0.0.1",
                                                   cfg["forward_iperf_port"], cfg["burst"],
                                                   cfg["rate"]), cfg["burst_gap"]),
        loop("forward_short_tcp", lambda k: short_tcp(k, fwd), 0.03),
        loop("forward_udp_flows", lambda k: udp_flow(k, fwd), 0.2),
        loop("api", lambda k: api_round(k, cfg["api"], cfg["guest_echo_port"], api_state), 0.5),
        loop("api_capture", lambda k: capture_round(k, cfg["api"], cfg["tmpdir"]), 30.0),
    ]
    return threads, [bulk_state]


def report(final=False):
    print(json.dumps({"t": round(time.monotonic() - START, 1), "final": final,
                      "kinds": {name: k.snapshot() for name, k in sorted(KINDS.items())}}),
          flush=True)


def main(argv):
    mode, arg = argv
    if mode == "dns":
        dns_server(int(arg))
        return 0
    cfg = json.loads(arg)
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    signal.signal(signal.SIGINT, lambda *_: STOP.set())
    threads, bulk_states = (guest_side if mode == "guest" else host_side)(cfg)
    print("ready", flush=True)
    while not STOP.wait(cfg.get("report", 10)):
        report()
    for state in bulk_states:                  # an iperf3 in flight ends with us
        proc = state.get("proc")
        if proc is not None and proc.poll() is None:
            proc.terminate()
    for t in threads:
        t.join(20)
    report(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
