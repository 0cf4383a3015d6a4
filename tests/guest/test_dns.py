"""DNS on the gateway.

Unit tests drive DnsResolverProxy / DnsHandler without sockets (a Clock or a
memory reactor, a fake upstream resolver, queries built with twisted.names).
Real-guest tests run dig and busybox nslookup in a namespace guest against a
twistd stack whose only upstream is a twisted.names server this module starts
on 127.0.0.1: no query ever leaves the machine.
"""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from conftest import in_ns, require_root, udhcpc
from dnsfakes import (
    BIG,
    GATEWAY,
    FakeUpstream,
    addresses,
    decode,
    query,
    standard_table,
)
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.names import dns

from arcbox_net.config import StackConfig
from arcbox_net.protocols.dns import GATEWAY_NAMES, DnsResolverProxy

SAFE_POLICY = ("--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8", "--deny", "::/0",
               "--allow", "::1/128")


def opt_records(m):
    return [r for r in m.additional if r.type == dns.OPT]


def make_proxy(config=None, table=None, **kw):
    clock = task.Clock()
    upstream = FakeUpstream(standard_table() if table is None else table)
    proxy = DnsResolverProxy(config or StackConfig(), reactor=clock, upstream=upstream, **kw)
    return proxy, clock, upstream


def ask(proxy, wire, stream=False):
    """The reply bytes (or None) of an answer that completes without time passing."""
    out = []
    proxy.answer(wire, stream=stream).addCallback(out.append)
    assert out, "the proxy did not answer synchronously"
    return out[0]


@pytest.mark.parametrize("name", GATEWAY_NAMES)
def test_local_names_answer_the_gateway(name):
    proxy, _, upstream = make_proxy()
    m = decode(ask(proxy, query(name)))
    assert m.rCode == dns.OK and m.answer and m.auth
    assert addresses(m) == [GATEWAY]
    assert not upstream.queries


def test_local_names_follow_the_configured_gateway():
    proxy, _, _ = make_proxy(StackConfig(subnet="192.168.77.0/24", gateway="192.168.77.254",
                                         guest="192.168.77.2"))
    assert addresses(decode(ask(proxy, query("host.docker.internal")))) == ["192.168.77.254"]


@pytest.mark.parametrize("qtype", [dns.MX, dns.TXT, 65])
def test_other_types_of_local_names_are_noerror_without_answer(qtype):
    proxy, _, upstream = make_proxy()
    m = decode(ask(proxy, query("host.arcbox.internal", qtype)))
    assert m.rCode == dns.OK            # not NXDOMAIN ...
    assert m.answers == []              # ... and not an A record
    assert [r.type for r in m.authority] == [dns.SOA]   # for negative caching
    assert not upstream.queries


def test_unknown_name_in_the_local_zone_is_nxdomain_without_upstream():
    proxy, _, upstream = make_proxy()
    m = decode(ask(proxy, query("nothing.arcbox.internal")))
    assert m.rCode == dns.ENAME and m.auth and not m.answers
    assert not upstream.queries


def test_dns_records_option():
    config = StackConfig(dns_records=["db.test=10.0.2.50", "db.test=10.0.2.51",
                                      "host.docker.internal=192.0.2.7", "Web.Example=192.0.2.8"])
    proxy, _, upstream = make_proxy(config)
    assert sorted(addresses(decode(ask(proxy, query("db.test"))))) == ["10.0.2.50", "10.0.2.51"]
    # a record replaces a built-in name; the others keep the gateway
    assert addresses(decode(ask(proxy, query("host.docker.internal")))) == ["192.0.2.7"]
    assert addresses(decode(ask(proxy, query("host.arcbox.internal")))) == [GATEWAY]
    assert addresses(decode(ask(proxy, query("web.example")))) == ["192.0.2.8"]
    m = decode(ask(proxy, query("db.test", dns.AAAA)))
    assert m.rCode == dns.OK and m.answers == []
    assert not upstream.queries


def test_dns_records_from_the_command_line():
    from arcbox_net.cli import Options
    options = Options()
    options.parseOptions(["--netns", "x", "--dns-record", "api.test=10.0.2.9",
                          "--dns-upstream", "127.0.0.1:5300", "--dns-timeout", "2.5"])
    proxy, _, _ = make_proxy(options.config)
    assert addresses(decode(ask(proxy, query("api.test")))) == ["10.0.2.9"]
    assert proxy.upstream.servers == [("127.0.0.1", 5300)] and proxy.upstream.timeout == 2.5


def test_names_are_case_insensitive_and_the_question_keeps_its_case():
    proxy, _, _ = make_proxy(StackConfig(dns_records=["MixedCase.Test=10.0.2.60"]))
    for name in ("HoSt.ArCbOx.InTeRnAl", "HOST.DOCKER.INTERNAL", "mixedcase.test",
                 "MIXEDCASE.TEST"):
        m = decode(ask(proxy, query(name)))
        assert addresses(m), name
        assert m.queries[0].name.name == name.encode()


def test_reverse_lookup_of_the_gateway():
    proxy, _, upstream = make_proxy()
    m = decode(ask(proxy, query("1.2.0.10.in-addr.arpa", dns.PTR)))
    assert m.rCode == dns.OK
    assert [r.payload.name.name for r in m.answers] == [b"host.arcbox.internal"]
    assert not upstream.queries


def test_reply_keeps_id_question_and_flags():
    proxy, _, _ = make_proxy()
    wire = query("HOST.arcbox.internal", qid=0xBEEF, rd=1)
    m = decode(ask(proxy, wire))
    assert m.id == 0xBEEF and m.answer == 1 and m.opCode == dns.OP_QUERY
    assert m.queries == [dns.Query("HOST.arcbox.internal", dns.A, dns.IN)]
    assert m.recDes == 1 and m.recAv == 1
    # the question section is byte-for-byte the query's
    assert ask(proxy, wire)[12:len(wire)] == wire[12:]
    m = decode(ask(proxy, query("www.example.test", qid=7, rd=0)))
    assert m.id == 7 and m.recDes == 0


def test_upstream_answer_is_forwarded_and_cached():
    proxy, clock, upstream = make_proxy()
    m = decode(ask(proxy, query("www.example.test")))
    assert m.rCode == dns.OK and addresses(m) == ["192.0.2.10"]
    assert not m.auth                        # the proxy is not the authority
    assert len(upstream.queries) == 1
    clock.advance(10)
    m = decode(ask(proxy, query("WWW.example.test")))
    assert addresses(m) == ["192.0.2.10"] and m.answers[0].ttl <= 290
    assert len(upstream.queries) == 1        # from the cache
    clock.advance(300)                        # TTL over: asked again
    ask(proxy, query("www.example.test"))
    assert len(upstream.queries) == 2


def test_upstream_nxdomain_reaches_the_guest_as_nxdomain():
    proxy, _, _ = make_proxy()
    m = decode(ask(proxy, query("missing.example.test")))
    assert m.rCode == dns.ENAME and m.answers == []
    assert [r.type for r in m.authority] == [dns.SOA]


def test_upstream_nodata_reaches_the_guest_as_noerror_without_answer():
    proxy, _, _ = make_proxy()
    m = decode(ask(proxy, query("nodata.example.test")))
    assert m.rCode == dns.OK and m.answers == []
    assert [r.type for r in m.authority] == [dns.SOA]


@pytest.mark.parametrize("name, rcode", [("refused.example.test", dns.EREFUSED),
                                         ("broken.example.test", dns.ESERVER),
                                         ("unknown.example.test", dns.ESERVER)])
def test_upstream_errors_are_not_turned_into_nxdomain(name, rcode):
    proxy, _, _ = make_proxy()
    assert decode(ask(proxy, query(name))).rCode == rcode


def test_upstream_timeout_is_servfail_within_dns_timeout():
    proxy, clock, upstream = make_proxy(StackConfig(dns_timeout=3.0))
    out = []
    proxy.answer(query("slow.example.test", qid=99)).addCallback(out.append)
    # a local name is answered at once while the upstream query is pending
    assert addresses(decode(ask(proxy, query("host.arcbox.internal")))) == [GATEWAY]
    clock.advance(2.9)
    assert out == []
    clock.advance(0.1)
    assert len(out) == 1
    m = decode(out[0])
    assert m.rCode == dns.ESERVER and m.id == 99
    assert proxy.counters["dns-upstream-timeout"] == 1
    assert proxy.pending == 0 and not clock.getDelayedCalls()


def test_missing_or_empty_resolv_conf_still_serves_local_names(tmp_path):
    for path in (tmp_path / "missing", tmp_path / "empty"):
        if path.name == "empty":
            path.write_text("")
        clock = task.Clock()
        proxy = DnsResolverProxy(StackConfig(), reactor=clock, resolv_conf=str(path))
        proxy.start()
        assert addresses(decode(ask(proxy, query("host.arcbox.internal")))) == [GATEWAY]
        assert proxy.upstream.resolver.resolv == str(path)
        proxy.stop()
        assert not [c for c in clock.getDelayedCalls() if c.active()]


def test_resolv_conf_is_the_default_upstream_and_is_reread(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 127.0.0.53\n")
    clock = task.Clock()
    proxy = DnsResolverProxy(StackConfig(), reactor=clock, resolv_conf=str(path))
    proxy.start()
    resolver = proxy.upstream.resolver
    assert resolver.dynServers == [("127.0.0.53", 53)]
    path.write_text("nameserver 127.0.0.54\nnameserver 127.0.0.55\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    clock.advance(61)
    assert resolver.dynServers == [("127.0.0.54", 53), ("127.0.0.55", 53)]
    proxy.stop()


def test_udp_reply_without_edns_fits_512_with_tc():
    proxy, _, _ = make_proxy()
    wire = ask(proxy, query("big.example.test"))
    m = decode(wire)
    assert len(wire) <= 512 and m.trunc
    assert 0 < len(m.answers) < 40 and set(addresses(m)) <= set(BIG)
    assert not opt_records(m)
    assert proxy.counters["dns-truncated"] == 1


def test_udp_reply_respects_the_edns_size_and_carries_opt():
    proxy, _, _ = make_proxy()
    wire = ask(proxy, query("big.example.test", edns_size=600))
    m = decode(wire)
    assert 512 < len(wire) <= 600 and m.trunc and 0 < len(m.answers) < 40
    assert len(opt_records(m)) == 1
    wire = ask(proxy, query("big.example.test", edns_size=1232))
    m = decode(wire)
    assert not m.trunc and sorted(addresses(m)) == sorted(BIG)
    (opt,) = opt_records(m)
    assert opt.cls >= 1232 and (opt.ttl >> 16) & 0xFF == 0   # our size, version 0


def test_edns_size_below_512_counts_as_512_and_mtu_caps_it():
    proxy, _, _ = make_proxy(StackConfig(mtu=576))
    assert len(ask(proxy, query("big.example.test", edns_size=100))) <= 512
    wire = ask(proxy, query("big.example.test", edns_size=4096))
    assert len(wire) <= 576 - 28 and decode(wire).trunc


def test_opt_only_when_the_query_had_one():
    proxy, _, _ = make_proxy()
    assert not opt_records(decode(ask(proxy, query("host.arcbox.internal"))))
    m = decode(ask(proxy, query("host.arcbox.internal", edns_size=1232)))
    assert len(opt_records(m)) == 1 and addresses(m) == [GATEWAY]
    m = decode(ask(proxy, query("missing.example.test", edns_size=1232)))
    assert m.rCode == dns.ENAME and len(opt_records(m)) == 1


def test_unknown_edns_version_gets_badvers():
    proxy, _, upstream = make_proxy()
    m = decode(ask(proxy, query("www.example.test", edns_size=1232, edns_version=1)))
    (opt,) = opt_records(m)
    assert (opt.ttl >> 24) == 1 and m.rCode == 0 and not m.answers     # BADVERS = 16
    assert not upstream.queries


def test_tcp_gets_the_full_answer():
    proxy, _, _ = make_proxy()
    wire = ask(proxy, query("big.example.test"), stream=True)
    m = decode(wire)
    assert not m.trunc and sorted(addresses(m)) == sorted(BIG) and len(wire) > 512


def test_tcp_protocol_speaks_length_prefixed_dns():
    proxy, clock, _ = make_proxy()
    protocol = proxy.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert proxy.connections == [protocol]
    q1, q2 = query("big.example.test", qid=1), query("host.arcbox.internal", qid=2)
    stream = struct.pack("!H", len(q1)) + q1 + struct.pack("!H", len(q2)) + q2
    for i in range(0, len(stream), 7):          # in pieces
        protocol.dataReceived(stream[i:i + 7])
    data = transport.value()
    replies = []
    while data:
        (n,) = struct.unpack("!H", data[:2])
        replies.append(decode(data[2:2 + n]))
        data = data[2 + n:]
    assert [r.id for r in replies] == [1, 2]
    assert len(replies[0].answers) == 40 and not replies[0].trunc
    assert addresses(replies[1]) == [GATEWAY]
    clock.advance(30)                            # idle: closed
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert proxy.connections == []


def _compression_loop():
    header = struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0)
    return header + b"\xc0\x0c" + struct.pack("!HH", 1, 1)

MALFORMED = {
    "empty": (b"", "dns-short"),
    "short header": (b"\x12\x34\x01", "dns-short"),
    "response": (query("a.test")[:2] + b"\x81\x80" + query("a.test")[4:], "dns-not-query"),
    "no question": (struct.pack("!6H", 1, 0x0100, 0, 0, 0, 0), "dns-malformed"),
    "two questions": (struct.pack("!6H", 1, 0x0100, 2, 0, 0, 0)
                      + query("a.test")[12:] * 2, "dns-malformed"),
    "truncated question": (query("host.arcbox.internal")[:20], "dns-malformed"),
    "missing additional": (query("a.test")[:10] + b"\x00\x01" + query("a.test")[12:],
                           "dns-malformed"),
    "label too long": (struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + b"\x3f" + b"a" * 10,
                       "dns-malformed"),
    "compression loop": (_compression_loop(), "dns-malformed"),
    "garbage": (b"\xff" * 40, "dns-not-query"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_queries_are_dropped_and_counted(case):
    payload, reason = MALFORMED[case]
    proxy, _, upstream = make_proxy()
    assert ask(proxy, payload) is None
    assert proxy.drops[reason] == 1 and sum(proxy.drops.values()) == 1
    assert not upstream.queries


def test_random_garbage_never_raises():
    import random
    rng = random.Random(5)
    proxy, clock, _ = make_proxy()
    base = query("www.example.test", edns_size=1232)
    for _ in range(3000):
        data = bytearray(base if rng.random() < 0.7 else os.urandom(rng.randrange(40)))
        for _ in range(rng.randrange(1, 6)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(len(data) + 1)]
        proxy.answer(bytes(data)).addErrback(lambda f: pytest.fail(str(f)))
    clock.advance(60)
    assert proxy.pending == 0


def test_other_opcodes_and_classes():
    proxy, _, upstream = make_proxy()
    assert decode(ask(proxy, query("a.test", opcode=dns.OP_STATUS))).rCode == dns.ENOTIMP
    assert decode(ask(proxy, query("version.bind", dns.TXT, cls=dns.CH))).rCode == dns.EREFUSED
    assert decode(ask(proxy, query("example.test", dns.AXFR))).rCode == dns.EREFUSED
    assert not upstream.queries

UPSTREAM_SERVER = r"""
import sys
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.names import authority, dns, server

ZONE = b"example.test"

class Zone(authority.FileAuthority):
    def loadFile(self, filename):
        soa = dns.Record_SOA(mname=b"ns." + ZONE, rname=b"admin." + ZONE, serial=1,
                             refresh=60, retry=60, expire=60, minimum=30, ttl=30)
        self.soa = (ZONE, soa)
        self.records = {
            ZONE: [soa],
            b"www." + ZONE: [dns.Record_A("192.0.2.10", ttl=30)],
            b"big." + ZONE: [dns.Record_A(f"198.51.100.{i}", ttl=30) for i in range(1, 41)],
            b"txt." + ZONE: [dns.Record_TXT(b"only text", ttl=30)],
            b"www6." + ZONE: [dns.Record_AAAA("2001:db8::abc", ttl=30)],
        }

interface = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"

factory = server.DNSServerFactory(authorities=[Zone(None)])
factory.noisy = False
for attempt in range(100):
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface=interface)
    port = udp.getHost().port
    try:
        reactor.listenTCP(port, factory, interface=interface)
        break
    except CannotListenError:
        udp.stopListening()
else:
    sys.exit("no port free for UDP and TCP")
print(port, flush=True)
reactor.run()
"""


def _upstream_server(interface):
    """A twisted.names authority for example.test on ``interface`` (UDP and TCP); its port."""
    proc = subprocess.Popen([sys.executable, "-c", UPSTREAM_SERVER, interface],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            proc.kill()
            raise AssertionError(f"upstream server failed: {line}{proc.stderr.read()}")
        yield int(line)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def upstream():
    """The example.test authority on 127.0.0.1; its port."""
    yield from _upstream_server("127.0.0.1")


@pytest.fixture
def upstream6():
    """The example.test authority on ::1; its port."""
    yield from _upstream_server("::1")


@pytest.fixture
def silent_upstream():
    """A UDP socket on 127.0.0.1 that reads queries and never answers; its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    done = threading.Event()
    received = []

    def drain():
        while not done.is_set():
            try:
                received.append(sock.recv(4096))
            except (socket.timeout, OSError):
                pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], received
    finally:
        done.set()
        thread.join(2)
        sock.close()


def require_dig():
    require_root()
    if shutil.which("dig") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dig is missing")
        pytest.skip("dig (dnsutils) is not installed")


def dig(ns, *args, timeout=60):
    return in_ns(ns, "dig", f"@{GATEWAY}", "+tries=1", "+time=5", *args, timeout=timeout).stdout


def status(out):
    return re.search(r"status: (\w+)", out).group(1)


def flags(out):
    return re.search(r";; flags: ([a-z ]*);", out).group(1).split()


def answer_count(out):
    return int(re.search(r"ANSWER: (\d+)", out).group(1))


def answer_addresses(out):
    return re.findall(r"\sIN\s+A\s+(\d+\.\d+\.\d+\.\d+)", out)


def answer_aaaa(out):
    return re.findall(r"\sIN\s+AAAA\s+([0-9a-f:]+)", out)


def start_guest_stack(stack_factory, netns, port, *extra, configure=True):
    args = ["--netns", netns, "--dns-upstream", f"127.0.0.1:{port}", *SAFE_POLICY, *extra]
    if configure:
        args.insert(2, "--configure")
    return stack_factory(*args)


@pytest.mark.realguest
def test_guest_dig_local_upstream_and_nxdomain(netns, stack_factory, upstream):
    require_dig()
    stack = start_guest_stack(stack_factory, netns, upstream, "--dns-record", "db.test=10.0.2.77")
    out = dig(netns, "host.arcbox.internal", "A")
    assert status(out) == "NOERROR" and answer_addresses(out) == [GATEWAY]
    assert "aa" in flags(out)
    out = dig(netns, "HOST.DOCKER.INTERNAL", "A")
    assert answer_addresses(out) == [GATEWAY]
    out = dig(netns, "host.arcbox.internal", "AAAA")
    assert status(out) == "NOERROR" and answer_aaaa(out) == ["fd00::1"]
    out = dig(netns, "db.test", "AAAA")          # an A record only: no data, not NXDOMAIN
    assert status(out) == "NOERROR" and answer_count(out) == 0
    assert answer_addresses(dig(netns, "db.test")) == ["10.0.2.77"]
    out = dig(netns, "www.example.test")
    assert status(out) == "NOERROR" and answer_addresses(out) == ["192.0.2.10"]
    out = dig(netns, "txt.example.test", "A")
    assert status(out) == "NOERROR" and answer_count(out) == 0
    out = dig(netns, "missing.example.test")
    assert status(out) == "NXDOMAIN" and answer_count(out) == 0
    assert "Traceback" not in stack.log()


@pytest.mark.realguest
def test_guest_large_answer_is_truncated_over_udp(netns, stack_factory, upstream):
    require_dig()
    start_guest_stack(stack_factory, netns, upstream)
    out = dig(netns, "+noedns", "+ignore", "big.example.test")
    assert "tc" in flags(out) and 0 < answer_count(out) < 40
    assert int(re.search(r"MSG SIZE\s+rcvd: (\d+)", out).group(1)) <= 512
    out = dig(netns, "+bufsize=600", "+ignore", "big.example.test")
    size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", out).group(1))
    assert "tc" in flags(out) and 512 < size <= 600 and 0 < answer_count(out) < 40
    assert "OPT PSEUDOSECTION" in out
    out = dig(netns, "+bufsize=1232", "big.example.test")
    assert "tc" not in flags(out) and sorted(answer_addresses(out)) == sorted(BIG)


@pytest.mark.realguest
def test_guest_large_answer_in_full_over_tcp(netns, stack_factory, upstream):
    require_dig()
    start_guest_stack(stack_factory, netns, upstream)
    out = dig(netns, "+tcp", "big.example.test")
    assert "tc" not in flags(out) and sorted(answer_addresses(out)) == sorted(BIG)
    out = dig(netns, "+noedns", "big.example.test")     # TC, then dig retries over TCP
    assert sorted(answer_addresses(out)) == sorted(BIG)


@pytest.mark.realguest
def test_guest_gets_servfail_when_upstream_never_answers(netns, stack_factory, silent_upstream):
    require_dig()
    port, received = silent_upstream
    stack = start_guest_stack(stack_factory, netns, port, "--dns-timeout", "3")
    slow = subprocess.Popen(["ip", "netns", "exec", netns, "dig", f"@{GATEWAY}", "+tries=1",
                             "+time=15", "lost.example.test"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        # the stack keeps answering while the upstream query hangs
        assert answer_addresses(dig(netns, "host.arcbox.internal")) == [GATEWAY]
        out, err = slow.communicate(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    assert status(out) == "SERVFAIL", out + err
    assert received, "the query never reached the upstream"
    assert "Traceback" not in stack.log()


@pytest.mark.realguest
def test_busybox_nslookup_with_the_dhcp_dns(netns, stack_factory, upstream, tmp_path):
    start_guest_stack(stack_factory, netns, upstream, configure=False)
    lease = udhcpc(netns, tmp_path / "lease")
    assert lease["dns"] == GATEWAY
    # `ip netns exec` shows /etc/netns/NS/resolv.conf as the guest's /etc/resolv.conf
    etc = f"/etc/netns/{netns}"
    os.makedirs(etc, exist_ok=True)
    try:
        with open(f"{etc}/resolv.conf", "w") as f:
            f.write(f"nameserver {lease['dns']}\n")
        out = in_ns(netns, "busybox", "nslookup", "host.arcbox.internal", timeout=30).stdout
        assert re.search(r"Address:?\s+(?:\d+:\s+)?10\.0\.2\.1\b(?!:)", out.split("Name:", 1)[1]), out
        out = in_ns(netns, "busybox", "nslookup", "www.example.test", timeout=30).stdout
        assert "192.0.2.10" in out
    finally:
        shutil.rmtree(etc, ignore_errors=True)


# -- IPv6 (issue 16): DNS on fd00::1, an upstream on [::1]

GATEWAY6 = "fd00::1"


def v6_guest(ns):
    """fd00::2 on the guest's TAP, without DAD: fd00::1 is on the link."""
    in_ns(ns, "ip", "-6", "addr", "add", "fd00::2/64", "dev", "tap0", "nodad")


def dig6(ns, *args, timeout=60):
    return in_ns(ns, "dig", "-6", f"@{GATEWAY6}", "+tries=1", "+time=5", *args,
                 timeout=timeout).stdout


def server_of(out):
    return re.search(r";; SERVER: ([^#\s]+)#(\d+)\([^)]*\) \((\w+)\)", out).groups()


@pytest.mark.realguest
def test_guest_dig_over_ipv6_local_records_and_a_v6_upstream(netns, stack_factory, upstream6,
                                                             tmp_path):
    require_dig()
    api = tmp_path / "api.sock"
    stack = stack_factory("--netns", netns, "--configure", "--dns-upstream",
                          f"[::1]:{upstream6}", *SAFE_POLICY, "--dns-record",
                          "db6.test=2001:db8::5", "--dns-record", "db4.test=10.0.2.77",
                          "--api", str(api))
    v6_guest(netns)
    out = dig6(netns, "host.arcbox.internal", "AAAA")
    assert status(out) == "NOERROR" and answer_aaaa(out) == [GATEWAY6] and "aa" in flags(out)
    assert server_of(out) == (GATEWAY6, "53", "UDP")
    assert answer_addresses(dig6(netns, "host.docker.internal", "A")) == [GATEWAY]
    assert answer_aaaa(dig6(netns, "db6.test", "AAAA")) == ["2001:db8::5"]
    for name, qtype in (("db6.test", "A"), ("db4.test", "AAAA")):
        out = dig6(netns, name, qtype)              # the other family: no data, not NXDOMAIN
        assert status(out) == "NOERROR" and answer_count(out) == 0, (name, out)
    out = dig6(netns, "-x", GATEWAY6)
    assert re.search(r"ip6\.arpa\.\s+\d+\s+IN\s+PTR\s+host\.arcbox\.internal\.", out), out
    # Names only the upstream on [::1] knows.
    out = dig6(netns, "www6.example.test", "AAAA")
    assert status(out) == "NOERROR" and answer_aaaa(out) == ["2001:db8::abc"]
    assert "aa" not in flags(out)
    assert answer_addresses(dig6(netns, "www.example.test")) == ["192.0.2.10"]
    assert status(dig6(netns, "missing.example.test")) == "NXDOMAIN"
    counters = api_get(api, "/stats")["counters"]
    assert counters["dns-queries"] == 9 and counters.get("dns-upstream-timeout", 0) == 0
    assert "Traceback" not in stack.log()


@pytest.mark.realguest
def test_guest_dns_over_tcp_on_fd00_1(netns, stack_factory, upstream6):
    require_dig()
    stack = stack_factory("--netns", netns, "--configure", "--dns-upstream",
                          f"[::1]:{upstream6}", *SAFE_POLICY)
    v6_guest(netns)
    out = dig6(netns, "+tcp", "host.arcbox.internal", "AAAA")
    assert server_of(out) == (GATEWAY6, "53", "TCP") and answer_aaaa(out) == [GATEWAY6]
    # 40 A records: more than 512 bytes. Over TCP all of them, which the stack
    # itself gets from the [::1] upstream over TCP after its UDP answer is cut.
    out = dig6(netns, "+tcp", "big.example.test")
    assert "tc" not in flags(out) and sorted(answer_addresses(out)) == sorted(BIG)
    out = dig6(netns, "+noedns", "big.example.test")     # TC over UDP, dig retries on TCP
    assert sorted(answer_addresses(out)) == sorted(BIG)
    assert "Traceback" not in stack.log()


def api_get(sock, path):
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--unix-socket", str(sock),
                          f"http://arcbox{path}"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return json.loads(out)
