"""Hostile frames from a real guest namespace: a second MAC on the link cannot
take the guest's traffic, forged sources and direct loopback addresses go
nowhere, and --no-host-loopback closes host loopback to mapped addresses too.

Forged frames leave the namespace's TAP through a raw packet socket
(tests/programs/rawsend.py); the frames are built with dpkt."""

import functools
import os
import socket
import subprocess
import sys
import time

import dpkt

from conftest import guest_tcp_client, in_ns
from hostside import HostServer, sender
from tcpclient import data_chunks

from .test_forward_api import api

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAWSEND = os.path.join(HERE, "programs", "rawsend.py")
GATEWAY_MAC = bytes.fromhex("02abcb000001")
OTHER_MAC = bytes.fromhex("02deadbeef01")
SAFE = ["--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8", "--map", "203.0.113.10=127.0.0.2"]
client = functools.partial(guest_tcp_client, timeout=180)


def ip4(text):
    return socket.inet_aton(text)


def guest_mac(ns):
    return bytes.fromhex(in_ns(ns, "cat", "/sys/class/net/tap0/address").stdout.strip()
                         .replace(":", ""))


def arp(op, sender_mac, sender_ip, target_ip="10.0.2.1"):
    body = dpkt.arp.ARP(hrd=1, pro=0x0800, hln=6, pln=4, op=op, sha=sender_mac,
                        spa=ip4(sender_ip), tha=b"\0" * 6, tpa=ip4(target_ip))
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=sender_mac, type=0x0806,
                                        data=body))


def udp_frame(src_mac, src_ip, dst_ip, dport, payload=b"forged"):
    u = dpkt.udp.UDP(sport=40000, dport=dport, data=payload)
    u.ulen = len(u)
    ip = dpkt.ip.IP(src=ip4(src_ip), dst=ip4(dst_ip), p=17, ttl=64, data=u)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(dst=GATEWAY_MAC, src=src_mac, type=0x0800, data=ip))


def rawsend(ns, count, interval, *frames):
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, RAWSEND, "tap0",
                             str(count), str(interval), *(f.hex() for f in frames)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def udp_listener(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(0.5)
    return s


def received(sock, wait=1.5):
    got = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            got.append(sock.recvfrom(2048)[0])
        except socket.timeout:
            pass
    return got


def test_arp_from_a_second_mac_during_a_download_does_not_take_the_traffic(
        netns, stack_factory, tmp_path):
    sock = tmp_path / "api.sock"
    stack_factory("--netns", netns, "--configure", *SAFE, "--api", str(sock))
    size = 20 * 1024 * 1024
    server = HostServer(sender(lambda: data_chunks(size, 5)), host="127.0.0.2")
    # The guest has spoken (its address is its MAC's); then probes (sender
    # 0.0.0.0) and claims of its address from another MAC, every
    # millisecond, all through the download.
    in_ns(netns, "ping", "-c", "1", "-W", "5", "10.0.2.1")
    spoofer = rawsend(netns, 0, 0.001, arp(1, OTHER_MAC, "0.0.0.0", "10.0.2.2"),
                      arp(1, OTHER_MAC, "10.0.2.2"), arp(2, OTHER_MAC, "10.0.2.2"))
    try:
        time.sleep(0.3)
        out = client(netns, "recv", "203.0.113.10", server.port)
        server.wait()
        assert out["bytes"] == size and out["sha256"] == server.results[0]
    finally:
        spoofer.kill()
        spoofer.wait(10)
        server.close()
    code, stats = api(sock, "GET", "/stats")
    assert code == 200
    assert stats["drops"]["arp-spoofed-sender"] > 100
    assert stats["neighbours"] == {"10.0.2.2": ":".join(f"{b:02x}" for b in guest_mac(netns))}


def test_with_configure_a_claim_before_the_guest_speaks_takes_nothing(
        netns, stack_factory, tmp_path):
    """--configure gave the TAP the guest address, so the TAP's MAC owns it
    from the start: claims from another MAC before the guest's first frame
    lose too."""
    sock = tmp_path / "api.sock"
    stack_factory("--netns", netns, "--configure", *SAFE, "--api", str(sock))
    rawsend(netns, 50, 0.001, arp(2, OTHER_MAC, "10.0.2.2"),
            udp_frame(OTHER_MAC, "10.0.2.2", "203.0.113.10", 9)).wait(30)
    size = 4 * 1024 * 1024
    server = HostServer(sender(lambda: data_chunks(size, 6)), host="127.0.0.2")
    try:
        out = client(netns, "recv", "203.0.113.10", server.port)
        server.wait()
        assert out["bytes"] == size and out["sha256"] == server.results[0]
    finally:
        server.close()
    code, stats = api(sock, "GET", "/stats")
    assert stats["drops"]["arp-spoofed-sender"] == 50
    assert stats["drops"]["spoofed-source"] == 50


def test_forged_source_addresses_are_dropped_and_counted(netns, stack_factory, tmp_path):
    sock = tmp_path / "api.sock"
    stack_factory("--netns", netns, "--configure", *SAFE, "--api", str(sock))
    listener = udp_listener("127.0.0.2")
    port = listener.getsockname()[1]
    try:
        mac = guest_mac(netns)
        in_ns(netns, "ping", "-c", "1", "-W", "5", "10.0.2.1")       # the guest speaks first
        forged = [udp_frame(mac, "10.0.2.99", "203.0.113.10", port),
                  udp_frame(mac, "192.0.2.44", "203.0.113.10", port),
                  udp_frame(OTHER_MAC, "10.0.2.2", "203.0.113.10", port)]
        rawsend(netns, 5, 0.01, *forged).wait(30)
        assert received(listener) == []
        code, stats = api(sock, "GET", "/stats")
        assert stats["drops"]["spoofed-source"] == 15
        # The guest's own address from its own MAC still goes through.
        rawsend(netns, 1, 0, udp_frame(mac, "10.0.2.2", "203.0.113.10", port, b"real")).wait(30)
        assert received(listener) == [b"real"]
    finally:
        listener.close()


def test_direct_loopback_destinations_are_martians(netns, stack_factory, tmp_path):
    sock = tmp_path / "api.sock"
    stack_factory("--netns", netns, "--configure", *SAFE, "--api", str(sock))
    listener = udp_listener("127.0.0.1")
    port = listener.getsockname()[1]
    try:
        mac = guest_mac(netns)
        in_ns(netns, "ping", "-c", "1", "-W", "5", "10.0.2.1")
        rawsend(netns, 3, 0.01, udp_frame(mac, "10.0.2.2", "127.0.0.1", port),
                udp_frame(mac, "10.0.2.2", "0.0.0.0", port)).wait(30)
        assert received(listener) == []
        code, stats = api(sock, "GET", "/stats")
        assert stats["drops"]["udp-martian"] == 6
        # Through the gateway alias host loopback is still there.
        rawsend(netns, 1, 0, udp_frame(mac, "10.0.2.2", "10.0.2.1", port, b"alias")).wait(30)
        assert received(listener) == [b"alias"]
    finally:
        listener.close()


def test_no_host_loopback_closes_mapped_addresses_too(netns, stack_factory, tmp_path):
    sock = tmp_path / "api.sock"
    stack_factory("--netns", netns, "--configure", *SAFE, "--no-host-loopback",
                  "--api", str(sock))
    mapped, direct = udp_listener("127.0.0.2"), udp_listener("127.0.0.1")
    try:
        mac = guest_mac(netns)
        in_ns(netns, "ping", "-c", "1", "-W", "5", "10.0.2.1")
        frames = [udp_frame(mac, "10.0.2.2", "203.0.113.10", mapped.getsockname()[1]),
                  udp_frame(mac, "10.0.2.2", "10.0.2.1", direct.getsockname()[1]),
                  udp_frame(mac, "10.0.2.2", "127.0.0.1", direct.getsockname()[1]),
                  udp_frame(mac, "10.0.2.2", "0.0.0.0", direct.getsockname()[1])]
        rawsend(netns, 2, 0.01, *frames).wait(30)
        assert received(mapped, 1.0) == [] and received(direct, 1.0) == []
        code, stats = api(sock, "GET", "/stats")
        drops = stats["drops"]
        assert (drops["udp-loopback-closed"], drops["udp-no-route"], drops["udp-martian"]) == \
            (2, 2, 4)
        # TCP and ICMP take the same decision: a connect and a ping to the
        # mapped address get nowhere.
        out = client(netns, "connect", "203.0.113.10", 22)
        assert out.get("error")
        ping = in_ns(netns, "ping", "-c", "1", "-W", "2", "203.0.113.10", check=False)
        assert ping.returncode != 0
    finally:
        mapped.close()
        direct.close()
