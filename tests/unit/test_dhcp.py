"""DhcpServer core: no reactor, a fake clock, client messages built with dpkt."""

import ipaddress
import random
import struct

import dpkt
import pytest

from arcbox_net.config import StackConfig
from arcbox_net.protocols.dhcp import DhcpServer, Lease, encode_name

D = dpkt.dhcp
MAC1 = bytes.fromhex("525400000001")
MAC2 = bytes.fromhex("525400000002")
MAC3 = bytes.fromhex("525400000003")
BCAST_IP = b"\xff" * 4
BCAST_MAC = b"\xff" * 6
IP = ipaddress.IPv4Address


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def client_msg(mtype, mac=MAC1, *, xid=0x1234, flags=0, ciaddr="0.0.0.0", giaddr="0.0.0.0",
               requested=None, server_id=None, hostname=None, op=D.DHCP_OP_REQUEST,
               extra=()):
    """A client message; every field explicit because dpkt's defaults are Python 2."""
    opts = [(D.DHCP_OPT_MSGTYPE, bytes([mtype]))]
    if requested is not None:
        opts.append((D.DHCP_OPT_REQ_IP, IP(requested).packed))
    if server_id is not None:
        opts.append((D.DHCP_OPT_SERVER_ID, IP(server_id).packed))
    if hostname is not None:
        opts.append((D.DHCP_OPT_HOSTNAME, hostname.encode()))
    opts.append((D.DHCP_OPT_PARAM_REQ, bytes([1, 3, 6, 15, 26, 119])))
    opts.extend(extra)
    msg = D.DHCP(op=op, hrd=1, hln=6, hops=0, xid=xid, secs=0, flags=flags,
                 ciaddr=int(IP(ciaddr)), yiaddr=0, siaddr=0, giaddr=int(IP(giaddr)),
                 chaddr=mac.ljust(16, b"\x00"), sname=b"\x00" * 64, file=b"\x00" * 128,
                 magic=D.DHCP_MAGIC, opts=opts, data=b"")
    return bytes(msg)


def decode(reply):
    msg = D.DHCP(reply.payload)
    assert bytes(msg) == reply.payload
    opts = {}
    for code, value in msg.opts:
        opts[code] = opts.get(code, b"") + value
    return msg, opts


def decode_names(raw):
    names, labels, i = [], [], 0
    while i < len(raw):
        n = raw[i]
        i += 1
        if n == 0:
            names.append(".".join(labels))
            labels = []
        else:
            assert n < 64, "compression pointers are not expected"
            labels.append(raw[i:i + n].decode())
            i += n
    assert not labels
    return names


@pytest.fixture
def clock():
    return Clock()


def make(clock, **kw):
    kw.setdefault("domain", "arcbox.internal")
    kw.setdefault("search", ("arcbox.internal", "example.com"))
    return DhcpServer(StackConfig(**kw), clock)


@pytest.fixture
def server(clock):
    return make(clock)


def dora(server, mac=MAC1, **kw):
    offer = server.handle(client_msg(D.DHCPDISCOVER, mac, **kw))
    assert offer is not None and offer.message_type == D.DHCPOFFER
    address = IP(D.DHCP(offer.payload).yiaddr)
    ack = server.handle(client_msg(D.DHCPREQUEST, mac, requested=address,
                                   server_id=server.config.gateway))
    assert ack is not None and ack.message_type == D.DHCPACK
    assert IP(D.DHCP(ack.payload).yiaddr) == address
    return address


def test_discover_offer_with_every_option(server):
    reply = server.handle(client_msg(D.DHCPDISCOVER, xid=0xCAFEBABE))
    assert reply.message_type == D.DHCPOFFER
    msg, opts = decode(reply)
    assert len(reply.payload) >= 300
    assert msg.op == D.DHCP_OP_REPLY and msg.hrd == 1 and msg.hln == 6
    assert msg.xid == 0xCAFEBABE and msg.flags == 0 and msg.giaddr == 0 and msg.ciaddr == 0
    assert msg.chaddr == MAC1
    assert IP(msg.yiaddr) == IP("10.0.2.2")
    assert IP(msg.siaddr) == IP("10.0.2.1")
    assert opts[D.DHCP_OPT_MSGTYPE] == bytes([D.DHCPOFFER])
    assert IP(opts[D.DHCP_OPT_SERVER_ID]) == IP("10.0.2.1")
    assert struct.unpack("!I", opts[D.DHCP_OPT_LEASE_SEC])[0] == 3600
    assert struct.unpack("!I", opts[D.DHCP_OPT_RENEWTIME])[0] == 1800
    assert struct.unpack("!I", opts[D.DHCP_OPT_REBINDTIME])[0] == 3150
    assert IP(opts[D.DHCP_OPT_NETMASK]) == IP("255.255.255.0")
    assert IP(opts[D.DHCP_OPT_ROUTER]) == IP("10.0.2.1")
    assert IP(opts[D.DHCP_OPT_DNS_SVRS]) == IP("10.0.2.1")
    assert struct.unpack("!H", opts[D.DHCP_OPT_MTUSIZE])[0] == 1500
    assert opts[D.DHCP_OPT_DOMAIN] == b"arcbox.internal"
    assert opts[119] == b"\x06arcbox\x08internal\x00\x07example\x03com\x00"
    assert decode_names(opts[119]) == ["arcbox.internal", "example.com"]
    # Unicast to the offered address and the client MAC (no broadcast flag).
    assert reply.dst_ip == IP("10.0.2.2").packed and reply.dst_mac == MAC1
    lease = server.lease_for(MAC1)
    assert lease.state == "offered" and lease.address == IP("10.0.2.2")


def test_options_follow_config(clock):
    server = make(clock, mtu=9000, dns="192.0.2.53", lease_time=600, domain=None, search=())
    _, opts = decode(server.handle(client_msg(D.DHCPDISCOVER)))
    assert struct.unpack("!H", opts[D.DHCP_OPT_MTUSIZE])[0] == 9000
    assert IP(opts[D.DHCP_OPT_DNS_SVRS]) == IP("192.0.2.53")
    assert struct.unpack("!III", opts[51] + opts[58] + opts[59]) == (600, 300, 525)
    assert D.DHCP_OPT_DOMAIN not in opts and 119 not in opts


def test_long_search_list_is_split_per_rfc3396(clock):
    names = tuple(f"{'x' * 60}{i}.example.com" for i in range(6))
    server = make(clock, search=names)
    msg = D.DHCP(server.handle(client_msg(D.DHCPDISCOVER)).payload)
    parts = [v for c, v in msg.opts if c == 119]
    assert len(parts) > 1 and all(len(p) <= 255 for p in parts)
    assert decode_names(b"".join(parts)) == list(names)
    assert encode_name("a.b.") == b"\x01a\x01b\x00"


def test_broadcast_flag(server):
    reply = server.handle(client_msg(D.DHCPDISCOVER, flags=0x8000))
    assert (reply.dst_ip, reply.dst_mac) == (BCAST_IP, BCAST_MAC)
    assert D.DHCP(reply.payload).flags == 0x8000


def test_full_dora_binds_and_reports(server, clock):
    bound = []
    server.on_lease = bound.append
    assert dora(server, hostname="guest1") == IP("10.0.2.2")
    lease = server.lease_for(MAC1)
    assert lease == Lease(MAC1, IP("10.0.2.2"), clock.now + 3600, "bound", "guest1")
    assert server.leases() == [lease]
    assert bound == [lease]


def test_second_mac_gets_next_address(server):
    assert dora(server, MAC1) == IP("10.0.2.2")
    assert dora(server, MAC2) == IP("10.0.2.3")
    assert [l.address for l in server.leases()] == [IP("10.0.2.2"), IP("10.0.2.3")]


def test_offers_are_held_against_other_macs(server):
    a = server.handle(client_msg(D.DHCPDISCOVER, MAC1))
    b = server.handle(client_msg(D.DHCPDISCOVER, MAC2))
    assert D.DHCP(a.payload).yiaddr != D.DHCP(b.payload).yiaddr
    # The same MAC asking again gets the same offer.
    again = server.handle(client_msg(D.DHCPDISCOVER, MAC1))
    assert D.DHCP(again.payload).yiaddr == D.DHCP(a.payload).yiaddr


def test_static_lease_wins_and_is_reserved(clock):
    server = make(clock, static_leases={"52:54:00:00:00:02": "10.0.2.2",
                                        "52:54:00:00:00:03": "10.0.2.50"})
    assert dora(server, MAC1) == IP("10.0.2.3")      # .2 is reserved for MAC2
    assert dora(server, MAC2) == IP("10.0.2.2")
    assert dora(server, MAC3, requested="10.0.2.9") == IP("10.0.2.50")
    # Nobody else may ask for a reserved address.
    reply = server.handle(client_msg(D.DHCPREQUEST, bytes.fromhex("525400000009"),
                                     requested="10.0.2.50"))
    assert reply.message_type == D.DHCPNAK


def test_discover_with_requested_free_address(server):
    reply = server.handle(client_msg(D.DHCPDISCOVER, requested="10.0.2.77"))
    assert IP(D.DHCP(reply.payload).yiaddr) == IP("10.0.2.77")
    for outside in ("10.0.3.5", "10.0.2.1", "10.0.2.255"):
        reply = server.handle(client_msg(D.DHCPDISCOVER, MAC2, requested=outside))
        assert IP(D.DHCP(reply.payload).yiaddr) == IP("10.0.2.2")


def test_nak_for_wrong_requested_address(server):
    server.handle(client_msg(D.DHCPDISCOVER))
    reply = server.handle(client_msg(D.DHCPREQUEST, requested="10.0.2.99", server_id="10.0.2.1"))
    assert reply.message_type == D.DHCPNAK
    msg, opts = decode(reply)
    assert msg.yiaddr == 0 and D.DHCP_OPT_LEASE_SEC not in opts
    assert IP(opts[D.DHCP_OPT_SERVER_ID]) == IP("10.0.2.1")
    assert (reply.dst_ip, reply.dst_mac) == (BCAST_IP, BCAST_MAC)
    # INIT-REBOOT with an address from another network.
    reply = server.handle(client_msg(D.DHCPREQUEST, MAC2, requested="192.168.1.10"))
    assert reply.message_type == D.DHCPNAK
    # An address bound to another MAC.
    dora(server, MAC3)
    held = server.lease_for(MAC3).address
    assert server.handle(client_msg(D.DHCPREQUEST, MAC2, requested=held)).message_type == D.DHCPNAK
    # No address at all.
    assert server.handle(client_msg(D.DHCPREQUEST, MAC2)).message_type == D.DHCPNAK


def test_init_reboot_for_an_address_never_offered_gets_a_nak(server):
    reply = server.handle(client_msg(D.DHCPREQUEST, requested="10.0.2.40"))
    assert reply.message_type == D.DHCPNAK
    assert server.lease_for(MAC1) is None and server.leases() == []
    assert server.drops["dhcp-nak-not-offered"] == 1


def test_init_reboot_gets_its_own_address_back(server, clock):
    dora(server, MAC1, requested="10.0.2.40")
    clock.now += 3601                                       # the lease lapsed
    assert server.lease_for(MAC1) is None
    reply = server.handle(client_msg(D.DHCPREQUEST, requested="10.0.2.40"))
    assert reply.message_type == D.DHCPACK
    assert server.lease_for(MAC1).address == IP("10.0.2.40")


def test_init_reboot_flood_from_random_macs_binds_nothing(server):
    """252 INIT-REBOOT REQUESTs, each from a new MAC for a pool address: all NAK."""
    rng = random.Random(20)
    for i in range(252):
        mac = bytes([0x02]) + rng.randbytes(5)
        reply = server.handle(client_msg(D.DHCPREQUEST, mac, requested=f"10.0.2.{i + 2}"))
        assert reply.message_type == D.DHCPNAK
    assert server.leases() == []
    assert dora(server, MAC1) == IP("10.0.2.2")          # the pool is all there


def test_allocation_is_constant_time_in_a_big_pool(clock):
    """A /16 with 20,000 offers out: each new DISCOVER looks at O(1) addresses."""
    server = make(clock, subnet="10.7.0.0/16", gateway="10.7.0.1", guest="10.7.0.2")
    calls = [0]
    usable = server._usable

    def counting(address, mac):
        calls[0] += 1
        return usable(address, mac)
    server._usable = counting
    for i in range(20000):
        mac = b"\x02" + i.to_bytes(5, "big")
        assert server.handle(client_msg(D.DHCPDISCOVER, mac)).message_type == D.DHCPOFFER
    before = calls[0]
    server.handle(client_msg(D.DHCPDISCOVER, b"\x02\xff\xff\xff\xff\xff"))
    assert calls[0] - before <= 4
    assert calls[0] < 5 * 20001


def test_offers_and_remembered_bindings_are_pruned(clock):
    import arcbox_net.protocols.dhcp as dhcp
    server = make(clock, subnet="10.7.0.0/16", gateway="10.7.0.1", guest="10.7.0.2")
    for round_ in range(3):
        for i in range(3000):
            mac = b"\x02" + (round_ * 3000 + i).to_bytes(5, "big")
            server.handle(client_msg(D.DHCPDISCOVER, mac))
        clock.now += 31                                      # every offer lapses
    assert server.leases() == []
    assert len(server._leases) == len(server._holder) == 0
    assert len(server._expiries) <= 64
    assert len(server._previous) <= dhcp.REMEMBERED
    # Lapsed addresses are offered again before never-used ones.
    reply = server.handle(client_msg(D.DHCPDISCOVER, MAC1))
    assert IP("10.7.0.2") <= IP(D.DHCP(reply.payload).yiaddr) < IP("10.7.0.2") + 3000


def test_release_frees_address(server):
    dora(server, MAC1)
    assert server.handle(client_msg(D.DHCPRELEASE, MAC1, ciaddr="10.0.2.2",
                                    server_id="10.0.2.1")) is None
    assert server.lease_for(MAC1) is None and server.leases() == []
    assert dora(server, MAC2) == IP("10.0.2.2")
    # A release for an address the MAC does not hold changes nothing.
    server.handle(client_msg(D.DHCPRELEASE, MAC1, ciaddr="10.0.2.2"))
    assert server.lease_for(MAC2).address == IP("10.0.2.2")
    assert server.drops["dhcp-release-unknown"] == 1


def test_released_mac_gets_its_address_back(server):
    dora(server, MAC1, requested="10.0.2.20")
    server.handle(client_msg(D.DHCPRELEASE, MAC1, ciaddr="10.0.2.20"))
    assert dora(server, MAC1) == IP("10.0.2.20")


def test_decline_skips_address(server, clock):
    dora(server, MAC1)
    assert server.handle(client_msg(D.DHCPDECLINE, MAC1, requested="10.0.2.2",
                                    server_id="10.0.2.1")) is None
    assert server.lease_for(MAC1) is None
    assert dora(server, MAC1) == IP("10.0.2.3")
    assert dora(server, MAC2) == IP("10.0.2.4")
    clock.now += 601
    assert dora(server, MAC3) == IP("10.0.2.2")


def test_inform(server):
    reply = server.handle(client_msg(D.DHCPINFORM, ciaddr="10.0.2.200", xid=77))
    assert reply.message_type == D.DHCPACK
    msg, opts = decode(reply)
    assert msg.yiaddr == 0 and msg.xid == 77 and IP(msg.ciaddr) == IP("10.0.2.200")
    for code in (D.DHCP_OPT_LEASE_SEC, D.DHCP_OPT_RENEWTIME, D.DHCP_OPT_REBINDTIME):
        assert code not in opts
    assert IP(opts[D.DHCP_OPT_ROUTER]) == IP("10.0.2.1") and opts[D.DHCP_OPT_DOMAIN]
    assert (reply.dst_ip, reply.dst_mac) == (IP("10.0.2.200").packed, MAC1)
    assert server.leases() == []


def test_renewal_is_unicast_and_extends(server, clock):
    dora(server)
    clock.now += 1800
    reply = server.handle(client_msg(D.DHCPREQUEST, ciaddr="10.0.2.2", flags=0x8000))
    assert reply.message_type == D.DHCPACK
    msg, _ = decode(reply)
    assert IP(msg.yiaddr) == IP("10.0.2.2") and IP(msg.ciaddr) == IP("10.0.2.2")
    assert (reply.dst_ip, reply.dst_mac) == (IP("10.0.2.2").packed, MAC1)
    assert server.lease_for(MAC1).expiry == clock.now + 3600
    # Renewing someone else's address is refused.
    reply = server.handle(client_msg(D.DHCPREQUEST, MAC2, ciaddr="10.0.2.2"))
    assert reply.message_type == D.DHCPNAK


def test_expiry_reclaims_address(server, clock):
    dora(server, MAC1)
    clock.now += 3599
    assert server.lease_for(MAC1) is not None
    clock.now += 1
    assert server.lease_for(MAC1) is None and server.leases() == []
    assert dora(server, MAC2) == IP("10.0.2.2")


def test_offer_hold_lapses(server, clock):
    server.handle(client_msg(D.DHCPDISCOVER, MAC1))
    clock.now += 31
    assert server.leases() == []
    reply = server.handle(client_msg(D.DHCPDISCOVER, MAC2))
    assert IP(D.DHCP(reply.payload).yiaddr) == IP("10.0.2.2")


def test_pool_exhaustion(clock):
    # /29: .1 gateway, pool .2-.6, .7 broadcast.
    server = make(clock, subnet="10.9.0.0/29", gateway="10.9.0.1", guest="10.9.0.2")
    macs = [bytes([0x52, 0x54, 0, 0, 1, i]) for i in range(6)]
    got = [dora(server, mac) for mac in macs[:5]]
    assert got == [IP(f"10.9.0.{i}") for i in range(2, 7)]
    assert server.handle(client_msg(D.DHCPDISCOVER, macs[5])) is None
    assert server.drops["dhcp-pool-exhausted"] == 1
    assert server.handle(client_msg(D.DHCPREQUEST, macs[5], requested="10.9.0.7")).message_type \
        == D.DHCPNAK


def test_request_for_other_server_is_ignored(server):
    server.handle(client_msg(D.DHCPDISCOVER, MAC1))
    assert server.lease_for(MAC1) is not None
    reply = server.handle(client_msg(D.DHCPREQUEST, MAC1, requested="192.168.0.9",
                                     server_id="192.168.0.1"))
    assert reply is None
    assert server.drops["dhcp-other-server"] == 1
    assert server.lease_for(MAC1) is None
    assert dora(server, MAC2) == IP("10.0.2.2")


@pytest.mark.parametrize("payload, reason", [
    (b"", "dhcp-malformed"),
    (b"\x01\x01\x06", "dhcp-malformed"),
    (client_msg(D.DHCPDISCOVER)[:242], "dhcp-malformed"),               # option 53 cut short
    (client_msg(D.DHCPDISCOVER)[:241], "dhcp-malformed"),               # no length byte
    (client_msg(D.DHCPOFFER, op=D.DHCP_OP_REPLY), "dhcp-not-request"),
    (client_msg(D.DHCPOFFER), "dhcp-unknown-type"),
    (client_msg(42), "dhcp-unknown-type"),
    (client_msg(D.DHCPDISCOVER, giaddr="10.0.0.1"), "dhcp-relayed"),
    (client_msg(D.DHCPDISCOVER, mac=b"\xff" * 6), "dhcp-bad-hardware"),
    (client_msg(D.DHCPDISCOVER)[:2] + b"\x10" + client_msg(D.DHCPDISCOVER)[3:],
     "dhcp-bad-hardware"),
    (client_msg(D.DHCPDISCOVER)[:240], "dhcp-malformed"),               # no option 53
    (client_msg(D.DHCPDISCOVER)[:236] + b"\0\0\0\0" + client_msg(D.DHCPDISCOVER)[240:],
     "dhcp-malformed"),                                                 # bad magic
])
def test_rejected_input(server, payload, reason):
    assert server.handle(payload) is None
    assert server.drops == {reason: 1}


def test_fuzz_never_raises(server, clock):
    rng = random.Random(20240611)
    seeds = [client_msg(t, bytes([0x52, 0, 0, 0, 0, rng.randrange(1, 8)]),
                        requested=f"10.0.2.{rng.randrange(256)}",
                        ciaddr=rng.choice(["0.0.0.0", "10.0.2.2"]),
                        server_id=rng.choice([None, "10.0.2.1", "1.2.3.4"]),
                        hostname=rng.choice([None, "h\xe9\x00"]))
             for t in range(1, 9)]
    replies = 0
    for i in range(2000):
        kind = i % 4
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
        else:
            data = bytearray(rng.choice(seeds))
            if kind == 1:
                data = data[:rng.randrange(len(data) + 1)]
            elif kind == 2:
                for _ in range(rng.randrange(1, 12)):
                    pos = rng.randrange(len(data))
                    data[pos] = rng.randrange(256)
            else:
                pos = rng.randrange(236, len(data))
                data[pos:] = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
            data = bytes(data)
        reply = server.handle(data)
        if reply is not None:
            replies += 1
            assert bytes(D.DHCP(reply.payload)) == reply.payload
            assert len(reply.dst_ip) == 4 and len(reply.dst_mac) == 6
        clock.now += rng.random() * 20
    assert replies > 50 and sum(server.drops.values()) > 500
    assert all(l.address in ipaddress.IPv4Network("10.0.2.0/24") for l in server.leases())


def test_a_discover_flood_cannot_keep_a_real_client_out(clock):
    """A /29 (pool .2-.6) flooded by DISCOVERs from made-up MACs: the real
    client still gets an address at once (the oldest offer is taken back)."""
    server = make(clock, subnet="10.9.0.0/29", gateway="10.9.0.1", guest="10.9.0.2")
    for i in range(50):
        server.handle(client_msg(D.DHCPDISCOVER, b"\x02\x99" + i.to_bytes(4, "big")))
    assert dora(server, MAC1) in {IP(f"10.9.0.{i}") for i in range(2, 7)}
    assert server.drops["dhcp-offer-reclaimed"] >= 46
    # Bound leases are never taken back: a full pool of bindings stays full.
    for i in range(2, 6):
        dora(server, bytes([0x52, 0x54, 0, 0, 2, i]))
    assert server.handle(client_msg(D.DHCPDISCOVER, MAC2)) is None
    assert server.drops["dhcp-pool-exhausted"] == 1
