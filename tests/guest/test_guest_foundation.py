"""A real Linux guest (a network namespace behind a TAP) served by twistd arcbox-net."""

import socket
import subprocess

import dpkt
import pytest

from conftest import TWISTD, in_ns, udhcpc


def test_dhcp_lease_reaches_the_guest(netns, stack_factory, tmp_path):
    stack_factory("--netns", netns, "--mtu", "1400", "--domain", "example.test",
                  "--search", "a.example.test", "--search", "b.example.test",
                  "--lease-time", "600")
    lease = udhcpc(netns, tmp_path / "lease")
    assert lease["ip"] == "10.0.2.2"
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == "10.0.2.1"
    assert lease["dns"] == "10.0.2.1"
    assert lease["serverid"] == "10.0.2.1"
    assert lease["mtu"] == "1400"
    assert lease["lease"] == "600"
    assert lease["domain"] == "example.test"
    assert lease["search"].split() == ["a.example.test", "b.example.test"]
    addr = in_ns(netns, "ip", "-4", "addr", "show", "dev", "tap0").stdout
    assert "inet 10.0.2.2/24" in addr
    assert "mtu 1400" in in_ns(netns, "ip", "link", "show", "tap0").stdout
    assert "default via 10.0.2.1 dev tap0" in in_ns(netns, "ip", "route").stdout


def test_guest_pings_gateway(netns, stack_factory, tmp_path):
    stack_factory("--netns", netns)
    udhcpc(netns, tmp_path / "lease")
    out = in_ns(netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.1").stdout
    assert "3 packets transmitted, 3 received" in out


def test_configure_mode_needs_no_dhcp(netns, stack_factory):
    stack_factory("--netns", netns, "--configure", "--mtu", "9000")
    link = in_ns(netns, "ip", "-4", "addr", "show", "dev", "tap0").stdout
    assert "inet 10.0.2.2/24" in link and "mtu 9000" in link and "UP" in link
    assert "default via 10.0.2.1 dev tap0" in in_ns(netns, "ip", "route").stdout
    out = in_ns(netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", "-s", "8000", "10.0.2.1").stdout
    assert "2 packets transmitted, 2 received" in out


def test_netns_by_path_and_custom_tap_name(netns, stack_factory, tmp_path):
    stack_factory("--netns", f"/var/run/netns/{netns}", "--tap-name", "eth7")
    lease = udhcpc(netns, tmp_path / "lease", iface="eth7")
    assert lease["ip"] == "10.0.2.2"


def test_two_guest_macs_get_pool_addresses(netns, stack_factory, tmp_path):
    """A second guest NIC (a macvlan on the TAP would need a bridge), so
    instead: after the first guest's lease, change the MAC and lease again."""
    stack_factory("--netns", netns)
    assert udhcpc(netns, tmp_path / "l1")["ip"] == "10.0.2.2"
    in_ns(netns, "ip", "link", "set", "tap0", "address", "02:00:00:00:00:99")
    assert udhcpc(netns, tmp_path / "l2")["ip"] == "10.0.2.3"


def test_stack_exits_cleanly_when_the_netns_tap_is_deleted(netns, stack_factory):
    stack = stack_factory("--netns", netns)
    in_ns(netns, "ip", "link", "del", "tap0")
    # Deleting the device makes the fd fail; the stack logs and exits.
    stack.proc.wait(10)
    log = stack.log()
    assert "guest link tap tap0 in netns" in log and "lost" in log
    assert "Traceback" not in log


def _frame_socketpair(kind):
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    ours.settimeout(5)
    return ours, theirs


def _arp_request(mac, target="10.0.2.1"):
    arp = dpkt.arp.ARP(hrd=1, pro=0x0800, hln=6, pln=4, op=dpkt.arp.ARP_OP_REQUEST,
                       sha=mac, spa=socket.inet_aton("10.0.2.2"), tha=b"\0" * 6,
                       tpa=socket.inet_aton(target))
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=mac, type=0x0806, data=arp))


def _discover(mac, xid=0x1234):
    msg = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, hrd=1, hln=6, hops=0, xid=xid, secs=0,
                         flags=0x8000, ciaddr=0, yiaddr=0, siaddr=0, giaddr=0,
                         chaddr=mac + b"\0" * 10, sname=b"\0" * 64, file=b"\0" * 128,
                         magic=dpkt.dhcp.DHCP_MAGIC,
                         opts=[(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPDISCOVER]))])
    u = dpkt.udp.UDP(sport=68, dport=67, data=bytes(msg))
    u.ulen = len(u)
    ip = dpkt.ip.IP(src=b"\0" * 4, dst=b"\xff" * 4, p=17, ttl=64, data=u)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=mac, type=0x0800, data=ip))


def _echo_request(mac, gw_mac, ident=7, seq=1, payload=b"arcbox"):
    echo = dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload))
    ip = dpkt.ip.IP(src=socket.inet_aton("10.0.2.2"), dst=socket.inet_aton("10.0.2.1"),
                    p=1, ttl=64, data=echo)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(dst=gw_mac, src=mac, type=0x0800, data=ip))


def _recv_not_ipv6(sock):
    """The next frame that is not IPv6 (router advertisements arrive unasked)."""
    while True:
        frame = sock.recv(65536)
        if frame[12:14] != b"\x86\xdd":
            return frame


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET],
                         ids=["dgram", "seqpacket"])
def test_fd_link_with_a_socketpair(kind, stack_factory):
    """twistd arcbox-net --fd N: ARP, DHCP and gateway ping over a socketpair."""
    ours, theirs = _frame_socketpair(kind)
    stack_factory("--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
    theirs.close()
    mac = b"\x02\x11\x22\x33\x44\x55"

    # Garbage first: it must be dropped, not kill the stack.
    for junk in (b"", b"\x01", b"\xff" * 13, b"\xff" * 12 + b"\x08\x00" + b"\x45" * 30,
                 b"\xff" * 12 + b"\x08\x06" + b"\x00" * 3):
        if junk or kind == socket.SOCK_DGRAM:
            ours.send(junk)

    ours.send(_arp_request(mac))
    reply = dpkt.ethernet.Ethernet(_recv_not_ipv6(ours))
    assert reply.type == 0x0806 and reply.dst == mac
    assert reply.data.op == dpkt.arp.ARP_OP_REPLY
    assert reply.data.spa == socket.inet_aton("10.0.2.1")
    gw_mac = reply.data.sha

    ours.send(_discover(mac))
    offer = dpkt.ethernet.Ethernet(_recv_not_ipv6(ours))
    dhcp = dpkt.dhcp.DHCP(offer.data.data.data)
    assert socket.inet_ntoa(dhcp.yiaddr.to_bytes(4, "big")) == "10.0.2.2"
    assert dict(dhcp.opts)[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes([dpkt.dhcp.DHCPOFFER])
    assert offer.data.data.sport == 67 and offer.data.data.dport == 68

    ours.send(_echo_request(mac, gw_mac, payload=b"x" * 1000))
    pong = dpkt.ethernet.Ethernet(_recv_not_ipv6(ours))
    icmp = pong.data.data
    assert pong.data.src == socket.inet_aton("10.0.2.1") and icmp.type == 0
    assert icmp.data.id == 7 and icmp.data.seq == 1 and icmp.data.data == b"x" * 1000
    ours.close()


def test_fd_link_peer_closing_stops_the_stack(stack_factory):
    ours, theirs = _frame_socketpair(socket.SOCK_SEQPACKET)
    stack = stack_factory("--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
    theirs.close()
    ours.close()
    assert stack.proc.wait(10) is not None
    log = stack.log()
    assert "guest link fd" in log and "lost" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("args, message", [
    (["--netns", "x", "--mtu", "70000"], "mtu 70000 is out of range"),
    (["--netns", "x", "--mtu", "big"], "--mtu takes a whole number"),
    (["--netns", "x", "--gateway", "10.0.3.1"], "gateway 10.0.3.1 is not inside subnet 10.0.2.0/24"),
    (["--netns", "x", "--subnet", "10.0.2.0/33"], "is not an IPv4 network"),
    (["--netns", "x", "--static-lease", "nonsense"], "--static-lease takes MAC=ADDRESS"),
    (["--netns", "x", "--busy-poll", "20000"], "--busy-poll takes 0..10000 microseconds"),
    (["--netns", "x", "--busy-poll", "soon"], "--busy-poll takes a whole number"),
    (["--no-such-option"], "no-such-option"),
    ([], "give exactly one of --fd, --tap, --netns"),
    (["--fd", "3", "--tap", "t"], "give exactly one of --fd, --tap, --netns"),
    (["--netns", "abx-surely-missing-ns"], "network namespace 'abx-surely-missing-ns' not found"),
    (["--fd", "0"], "fd 0 is not a usable socket"),  # stdin is a pipe here
])
def test_bad_options_exit_nonzero_with_one_line(args, message):
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "arcbox-net", *args],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.PIPE)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_plugin_is_listed_by_twistd():
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=30)
    assert "arcbox-net" in result.stdout
    result = subprocess.run([TWISTD, "arcbox-net", "--help"], capture_output=True, text=True,
                            timeout=30)
    for option in ("--fd", "--tap", "--netns", "--tap-name", "--configure", "--mtu",
                   "--ready-fd", "--subnet", "--gateway", "--search", "--static-lease"):
        assert option in result.stdout


def test_tap_link_in_the_current_namespace(netns, stack_factory, tmp_path):
    """--tap NAME: the stack runs inside the namespace (ip netns exec) and makes the TAP there."""
    stack_factory("--tap", "tap7", prefix=["ip", "netns", "exec", netns])
    lease = udhcpc(netns, tmp_path / "lease", iface="tap7")
    assert lease["ip"] == "10.0.2.2" and lease["router"] == "10.0.2.1"
    out = in_ns(netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.0.2.1").stdout
    assert "2 packets transmitted, 2 received" in out
