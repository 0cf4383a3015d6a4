"""The atheris target fuzz/fuzz_dispatch.py, run without atheris: its seeds
must do what they are meant to (so the target cannot rot into feeding the
stack inputs that all die in the first parser), and a thousand or two
mutations of them must pass its checks (no handler error, no bad frame)."""

import importlib.util
import random
import sys
from pathlib import Path

import dpkt
import pytest

_PATH = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_dispatch.py"


def _load():
    spec = importlib.util.spec_from_file_location("fuzz_dispatch", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fz = _load()
SEEDS = fz.seed_inputs()


@pytest.fixture
def harness():
    h = fz.Harness()
    yield h
    h.close()


def _ipv4_frames(h):
    out = []
    for frame in h.link.frames:
        eth = dpkt.ethernet.Ethernet(frame)
        if isinstance(eth.data, dpkt.ip.IP):
            out.append(eth.data)
    return out


def test_the_target_needs_no_atheris():
    assert "atheris" not in sys.modules


def test_arp_seed_is_answered(harness):
    harness.run(SEEDS["arp-request"])
    arps = [dpkt.ethernet.Ethernet(f).data for f in harness.link.frames
            if f[12:14] == b"\x08\x06"]
    assert [(a.op, a.sha, a.tpa) for a in arps] == [(2, fz.GATEWAY_MAC, bytes([10, 0, 2, 2]))]


def test_dhcp_seed_gets_an_offer_and_an_ack(harness):
    harness.run(SEEDS["dhcp-discover-request"])
    types = []
    for ip in _ipv4_frames(harness):
        msg = dpkt.dhcp.DHCP(bytes(ip.data.data))
        types.append(dict(msg.opts)[dpkt.dhcp.DHCP_OPT_MSGTYPE][0])
    assert types == [dpkt.dhcp.DHCPOFFER, dpkt.dhcp.DHCPACK]


def test_icmp_seeds_get_echo_replies_from_gateway_and_remote(harness):
    harness.run(SEEDS["icmp-echo-gateway"])
    harness.run(SEEDS["icmp-echo-remote"])
    (reply,) = _ipv4_frames(harness)
    assert reply.src == bytes([203, 0, 113, 10]) and reply.data.type == 0
    assert harness.stack.icmp.echo.replies == 1


def test_dns_seed_gets_a_local_and_an_upstream_answer(harness):
    harness.run(SEEDS["dns-query"])
    answers = [dpkt.dns.DNS(bytes(ip.data.data)) for ip in _ipv4_frames(harness)]
    assert [(a.id, [bytes(r.ip) for r in a.an]) for a in answers] == [
        (7, [bytes([10, 0, 2, 9])]), (8, [bytes([203, 0, 113, 10])])]


def test_udp_seed_gets_the_host_reply_and_its_icmp_error(harness):
    harness.run(SEEDS["udp-flow"])
    udp_reply, error = _ipv4_frames(harness)
    assert udp_reply.src == bytes([203, 0, 113, 10]) and bytes(udp_reply.data.data) == b"world"
    assert (error.data.type, error.data.code) == (3, 3)


def test_tcp_handshake_seed_moves_data_both_ways_and_closes(harness):
    harness.run(SEEDS["tcp-handshake-data-fin"])
    counters = harness.stack.tcp.counters
    assert counters["tcp-established"] == 1 and counters["tcp-closed"] == 1
    segments = [ip.data for ip in _ipv4_frames(harness)]
    assert segments[0].flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK
    assert sum(len(s.data) for s in segments) == len(b"HTTP/1.0 200 OK\r\n\r\n") + 3000
    assert harness.host_written == len(b"GET / HTTP/1.0\r\n\r\n")
    assert harness.stack.tcp.connections == {}


def test_refused_connect_and_connect_timeout_seeds(harness):
    harness.run(SEEDS["tcp-syn"])
    (rst,) = _ipv4_frames(harness)
    assert rst.data.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and rst.data.ack == 1001
    harness.run(SEEDS["clock"])
    (unreachable,) = _ipv4_frames(harness)
    assert (unreachable.data.type, unreachable.data.code) == (3, 1)


def test_dns_over_tcp_seed_reaches_the_local_listener(harness):
    harness.run(SEEDS["dns-over-tcp-syn"])
    (synack,) = _ipv4_frames(harness)
    assert synack.src == bytes([10, 0, 2, 1]) and synack.data.sport == 53
    assert synack.data.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK


def _ipv6_to_guest(h):
    """(next header, first byte of the L4 message) of each unicast IPv6 frame."""
    out = []
    for frame in h.link.frames:
        if frame[12:14] == b"\x86\xdd" and not frame[0] & 1:  # unicast, to a guest
            out.append((frame[20], frame[54] if frame[20] == 58 else frame[62]))
    return out


@pytest.mark.parametrize("name, answer", [
    ("ipv6-rs", (58, 134)),                 # a router advertisement
    ("ipv6-ns-gateway", (58, 136)),         # a neighbour advertisement
    ("dhcpv6-solicit", (17, 2)),            # ADVERTISE
    ("icmpv6-echo-gateway", (58, 129)),     # echo reply
    ("icmpv6-echo-remote", (58, 129)),      # through the echo NAT and back
])
def test_ipv6_seeds_are_answered(harness, name, answer):
    harness.run(SEEDS[name])
    assert _ipv6_to_guest(harness) == [answer]


def test_ipv6_tcp_and_udp_seeds_go_through_the_nat(harness):
    harness.run(SEEDS["tcp6-handshake"])
    assert harness.stack.tcp.counters["tcp-established"] == 1
    tcp = [f for f in harness.link.frames if f[12:14] == b"\x86\xdd" and f[20] == 6]
    assert sum(len(f) - 54 - ((f[66] >> 4) * 4) for f in tcp) >= 2000  # the host's bytes
    harness.run(SEEDS["udp6-flow"])
    assert [f[62:] for f in harness.link.frames if f[20] == 17] == [b"back6"]
    harness.run(SEEDS["flood-dhcpv6"])
    assert _ipv6_to_guest(harness).count((17, 2)) == fz.FLOOD  # one per made-up client


def test_mutated_seeds_never_break_the_checks(harness):
    rng = random.Random(20)
    seeds = list(SEEDS.values())
    for _ in range(1500):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            del data[rng.randrange(len(data)):]
        harness.run(bytes(data))
    assert harness.inputs == 1500 and harness.dispatcher.frames_in > 1500


def test_flood_seeds_fill_the_tables_as_made_up_clients_would(harness):
    harness.run(SEEDS["flood-dhcp"])
    assert len(harness.stack.dhcp.core.leases()) == fz.FLOOD  # one offer per made-up MAC
    harness.run(SEEDS["flood-udp"])
    assert len(harness.stack.udp.table) == fz.FLOOD
    harness.run(SEEDS["flood-syn"])
    assert harness.stack.tcp.counters["tcp-opened"] == fz.FLOOD
    harness.run(SEEDS["flood-dns"])
    assert len(harness.upstream.pending) == fz.FLOOD
