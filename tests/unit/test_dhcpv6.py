"""The DHCPv6 server core, driven by messages laid out as isc-dhcp-client
(``dhclient -6``) and dhcpcd send them: Solicit with a DUID-LLT client id,
IA_NA, ORO 23/24 and elapsed time; then Request, Renew after T1, Rebind,
Release, Decline, Confirm, Information-Request; caps, expiry, malformed input.

Client messages are assembled here byte by byte with struct (not with the
module's own builders), and replies are read the same way."""

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcbox_net.protocols import dhcpv6

GW_MAC = bytes.fromhex("02abcb000001")
MAC_A = bytes.fromhex("525400aaaaaa")
MAC_B = bytes.fromhex("525400bbbbbb")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _opt(code, value=b""):
    return struct.pack("!HH", code, len(value)) + value


def _llt(mac, t=0x2A2B2C2D):
    return struct.pack("!HHI", 1, 1, t) + mac


def _ll(mac):
    return struct.pack("!HH", 3, 1) + mac


def _ia(iaid, addresses=(), t1=0, t2=0):
    inner = b"".join(_opt(5, ipaddress.IPv6Address(a).packed + struct.pack("!II", 0, 0))
                     for a in addresses)
    return _opt(3, struct.pack("!III", iaid, t1, t2) + inner)


def _client(msg_type, duid, *options, xid=0x123456, oro=(23, 24), elapsed=0):
    """What dhclient -6 / dhcpcd put in every message: client id, ORO, elapsed time."""
    body = _opt(1, duid) + _opt(6, b"".join(struct.pack("!H", o) for o in oro)) \
        + _opt(8, struct.pack("!H", elapsed))
    return bytes([msg_type]) + xid.to_bytes(3, "big") + body + b"".join(options)


SERVER_DUID = struct.pack("!HH", 3, 1) + GW_MAC


def _read(payload):
    """(type, xid, {code: [values]}) of a reply, parsed by hand."""
    msg_type, xid = payload[0], int.from_bytes(payload[1:4], "big")
    opts, pos = {}, 4
    while pos < len(payload):
        code, size = struct.unpack_from("!HH", payload, pos)
        opts.setdefault(code, []).append(payload[pos + 4:pos + 4 + size])
        pos += 4 + size
    assert pos == len(payload)
    return msg_type, xid, opts


def _ia_of(value):
    """(iaid, t1, t2, [(address, preferred, valid)], status or None)."""
    iaid, t1, t2 = struct.unpack_from("!III", value)
    _t, _x, inner = _read(b"\0\0\0\0" + value[12:])
    addresses = [(str(ipaddress.IPv6Address(v[:16])), *struct.unpack_from("!II", v, 16))
                 for v in inner.get(5, [])]
    status = struct.unpack_from("!H", inner[13][0])[0] if 13 in inner else None
    return iaid, t1, t2, addresses, status


def _status(opts):
    return struct.unpack_from("!H", opts[13][0])[0] if 13 in opts else None


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def server(clock):
    srv = dhcpv6.Dhcpv6Server(GW_MAC, clock, search=("example.internal",))
    srv.bound, srv.unbound = [], []
    srv.on_bind = srv.bound.append
    srv.on_unbind = srv.unbound.append
    return srv


def _solicit(server, mac=MAC_A, iaid=1, extra=(), src_mac=None, duid=None):
    duid = duid or _llt(mac)
    # dhcpcd adds an FQDN and a vendor class: options the server ignores.
    msg = _client(1, duid, _ia(iaid), _opt(39, b"\x01\x04host\x00"), *extra)
    reply = server.handle(msg, src_mac=src_mac)
    assert reply is not None
    return _read(reply.payload)


def _lease(server, mac=MAC_A, iaid=1, src_mac=None):
    """Solicit, then Request what was advertised: the address bound."""
    _t, _x, opts = _solicit(server, mac, iaid, src_mac=src_mac)
    _iaid, _t1, _t2, [(address, _p, _v)], _s = _ia_of(opts[3][0])
    reply = server.handle(_client(3, _llt(mac), _opt(2, SERVER_DUID), _ia(iaid, [address])),
                          src_mac=src_mac)
    msg_type, _x, opts = _read(reply.payload)
    assert msg_type == dhcpv6.REPLY
    return address, opts


def test_solicit_gets_an_advertise_with_fd00_2_dns_and_domain_list(server):
    msg_type, xid, opts = _solicit(server)
    assert (msg_type, xid) == (dhcpv6.ADVERTISE, 0x123456)
    assert opts[2] == [SERVER_DUID] and opts[1] == [_llt(MAC_A)]
    assert opts[7] == [b"\xff"]                                # preference 255
    iaid, t1, t2, addresses, status = _ia_of(opts[3][0])
    assert (iaid, t1, t2, addresses, status) == (1, 1800, 2880, [("fd00::2", 3600, 7200)], None)
    assert opts[23] == [ipaddress.IPv6Address("fd00::1").packed]
    assert opts[24] == [b"\x07example\x08internal\x00"]
    # Advertised, not bound: nothing told to the neighbour table yet.
    assert server.bound == [] and server.bindings()[0].state == "offered"


def test_options_not_in_the_oro_are_left_out(server):
    reply = server.handle(_client(1, _llt(MAC_A), _ia(1), oro=()))
    _t, _x, opts = _read(reply.payload)
    assert 23 not in opts and 24 not in opts


def test_request_binds_the_address_and_tells_the_neighbour_table(server, clock):
    address, opts = _lease(server)
    assert address == "fd00::2"
    assert _ia_of(opts[3][0])[3] == [("fd00::2", 3600, 7200)]
    assert opts[23] and opts[24]
    [binding] = server.bound
    assert (str(binding.address), binding.mac, binding.state) == ("fd00::2", MAC_A, "bound")
    assert binding.expiry == clock.now + 7200
    second, _opts = _lease(server, MAC_B)
    assert second == "fd00::3"


def test_two_clients_soliciting_together_get_distinct_addresses(server):
    a = _ia_of(_solicit(server, MAC_A)[2][3][0])[3][0][0]
    b = _ia_of(_solicit(server, MAC_B)[2][3][0])[3][0][0]
    assert (a, b) == ("fd00::2", "fd00::3")
    # The same client soliciting again is offered the same address.
    assert _ia_of(_solicit(server, MAC_A)[2][3][0])[3][0][0] == "fd00::2"


def test_rapid_commit_binds_at_once(server):
    msg_type, _x, opts = _solicit(server, extra=[_opt(14)])
    assert msg_type == dhcpv6.REPLY and opts[14] == [b""]
    assert _ia_of(opts[3][0])[3][0][0] == "fd00::2"
    assert server.bindings()[0].state == "bound" and len(server.bound) == 1


def test_renew_after_t1_extends_the_binding(server, clock):
    address, _opts = _lease(server)
    clock.now += 1800                                        # T1
    reply = server.handle(_client(5, _llt(MAC_A), _opt(2, SERVER_DUID), _ia(1, [address]),
                                  xid=0x777777, elapsed=0))
    msg_type, xid, opts = _read(reply.payload)
    assert (msg_type, xid) == (dhcpv6.REPLY, 0x777777)
    assert _ia_of(opts[3][0]) == (1, 1800, 2880, [("fd00::2", 3600, 7200)], None)
    assert server.bindings()[0].expiry == clock.now + 7200
    # Past the first expiry the binding lives on.
    clock.now += 7200 - 1
    assert [str(b.address) for b in server.bindings()] == ["fd00::2"]
    assert server.unbound == []


def test_renew_after_a_server_restart_rebinds_a_free_address(clock):
    srv = dhcpv6.Dhcpv6Server(GW_MAC, clock)
    reply = srv.handle(_client(5, _llt(MAC_A), _opt(2, SERVER_DUID), _ia(1, ["fd00::9"])))
    assert _ia_of(_read(reply.payload)[2][3][0])[3] == [("fd00::9", 3600, 7200)]
    # An address outside the subnet is no binding of ours.
    reply = srv.handle(_client(5, _llt(MAC_B), _opt(2, SERVER_DUID), _ia(1, ["2001:db8::9"])))
    assert _ia_of(_read(reply.payload)[2][3][0])[4] == dhcpv6.STATUS_NO_BINDING


def test_renew_for_another_clients_address_gets_no_binding(server):
    _lease(server, MAC_A)
    reply = server.handle(_client(5, _llt(MAC_B), _opt(2, SERVER_DUID), _ia(1, ["fd00::2"])))
    assert _ia_of(_read(reply.payload)[2][3][0])[4] == dhcpv6.STATUS_NO_BINDING


def test_rebind_extends_and_zeroes_addresses_not_the_clients(server, clock):
    address, _opts = _lease(server)
    clock.now += 2880                                        # T2
    reply = server.handle(_client(6, _llt(MAC_A), _ia(1, [address, "fd00::77"])))
    _iaid, _t1, _t2, addresses, _s = _ia_of(_read(reply.payload)[2][3][0])
    assert addresses == [("fd00::2", 3600, 7200), ("fd00::77", 0, 0)]
    reply = server.handle(_client(6, _llt(MAC_B), _ia(4, ["2001:db8::1"])))
    assert _ia_of(_read(reply.payload)[2][3][0])[3] == [("2001:db8::1", 0, 0)]


def test_release_frees_the_address_for_the_next_client(server):
    address, _opts = _lease(server, MAC_A)
    reply = server.handle(_client(8, _llt(MAC_A), _opt(2, SERVER_DUID), _ia(1, [address])))
    _t, _x, opts = _read(reply.payload)
    assert _status(opts) == dhcpv6.STATUS_SUCCESS and 3 not in opts
    assert server.bindings() == [] and [str(b.address) for b in server.unbound] == ["fd00::2"]
    assert _lease(server, MAC_B)[0] == "fd00::2"


def test_release_of_an_unknown_binding_says_no_binding(server):
    reply = server.handle(_client(8, _llt(MAC_A), _opt(2, SERVER_DUID), _ia(1, ["fd00::2"])))
    _t, _x, opts = _read(reply.payload)
    assert _status(opts) == dhcpv6.STATUS_SUCCESS
    assert _ia_of(opts[3][0])[4] == dhcpv6.STATUS_NO_BINDING
    assert server.drops["dhcpv6-release-unknown"] == 1


def test_decline_keeps_the_address_out_of_the_pool_for_a_while(server, clock):
    address, _opts = _lease(server, MAC_A)
    reply = server.handle(_client(9, _llt(MAC_A), _opt(2, SERVER_DUID), _ia(1, [address])))
    assert _status(_read(reply.payload)[2]) == dhcpv6.STATUS_SUCCESS
    assert server.is_declined(address) and server.unbound
    # The declining client itself and every other get another address.
    assert _lease(server, MAC_A)[0] == "fd00::3"
    assert _lease(server, MAC_B)[0] == "fd00::4"
    clock.now += dhcpv6.DECLINE_HOLD + 1
    assert not server.is_declined(address)
    assert _lease(server, bytes.fromhex("525400cccccc"))[0] == "fd00::2"


def test_confirm_answers_on_link_or_not(server):
    reply = server.handle(_client(4, _llt(MAC_A), _ia(1, ["fd00::2"])))
    assert _status(_read(reply.payload)[2]) == dhcpv6.STATUS_SUCCESS
    reply = server.handle(_client(4, _llt(MAC_A), _ia(1, ["2001:db8::2"])))
    assert _status(_read(reply.payload)[2]) == dhcpv6.STATUS_NOT_ON_LINK
    assert server.handle(_client(4, _llt(MAC_A), _ia(1))) is None
    assert server.drops["dhcpv6-confirm-empty"] == 1


def test_information_request_gets_dns_and_domains_without_addresses(server):
    # dhclient -6 -S / the O flag: stateless configuration, client id optional.
    msg = bytes([11]) + b"\x00\x00\x09" + _opt(6, struct.pack("!HH", 23, 24)) \
        + _opt(8, b"\x00\x00")
    msg_type, xid, opts = _read(server.handle(msg).payload)
    assert (msg_type, xid) == (dhcpv6.REPLY, 9)
    assert opts[23] == [ipaddress.IPv6Address("fd00::1").packed] and 3 not in opts
    assert 1 not in opts and opts[2] == [SERVER_DUID]
    assert server.bindings() == []


def test_static_lease_by_mac_from_the_duid_or_the_frame_source(clock):
    static = ipaddress.IPv6Address("fd00::100")
    srv = dhcpv6.Dhcpv6Server(GW_MAC, clock, static_leases=[(MAC_A, static)])
    assert _lease(srv, MAC_A)[0] == "fd00::100"                   # MAC from DUID-LLT
    # DUID-LL of another MAC, but the frame came from MAC_A: the frame wins, and
    # the static address moves to the new DUID (the guest changed DHCP clients).
    reply = srv.handle(_client(1, _ll(MAC_B), _ia(7), _opt(14)), src_mac=MAC_A)
    assert _ia_of(_read(reply.payload)[2][3][0])[3][0][0] == "fd00::100"
    [binding] = srv.bindings()
    assert (binding.duid, binding.iaid, binding.mac) == (_ll(MAC_B), 7, MAC_A)
    # Nobody else gets the static address, even asking for it.
    reply = srv.handle(_client(1, _ll(MAC_B), _ia(1, ["fd00::100"])), src_mac=MAC_B)
    assert _ia_of(_read(reply.payload)[2][3][0])[3][0][0] == "fd00::2"
    # A DUID with no MAC in it (DUID-EN) and no frame source: the pool.
    duid_en = struct.pack("!HI", 2, 32473) + b"opaque"
    reply = srv.handle(_client(1, duid_en, _ia(1)))
    assert _ia_of(_read(reply.payload)[2][3][0])[3][0][0] == "fd00::3"


def test_binding_cap_answers_no_addrs_avail_until_offers_lapse(clock):
    srv = dhcpv6.Dhcpv6Server(GW_MAC, clock, max_bindings=5)
    for i in range(5):
        _solicit(srv, bytes([0x52, 0, 0, 0, 0, i]))
    _t, _x, opts = _solicit(srv, MAC_B)
    assert _ia_of(opts[3][0])[4] == dhcpv6.STATUS_NO_ADDRS_AVAIL
    assert srv.drops["dhcpv6-bindings-full"] >= 1 and len(srv.bindings()) == 5
    clock.now += dhcpv6.OFFER_HOLD + 1
    _t, _x, opts = _solicit(srv, MAC_B)
    assert _ia_of(opts[3][0])[4] is None and len(srv.bindings()) == 1


def test_one_mac_cannot_take_more_than_its_share(clock):
    srv = dhcpv6.Dhcpv6Server(GW_MAC, clock, per_mac=3)
    statuses = [_ia_of(_solicit(srv, MAC_A, iaid=i, src_mac=MAC_A)[2][3][0])[4] for i in range(5)]
    assert statuses == [None, None, None, 2, 2]
    assert srv.drops["dhcpv6-mac-bindings-full"] == 2


def test_a_flood_of_made_up_duids_stays_bounded(clock):
    srv = dhcpv6.Dhcpv6Server(GW_MAC, clock, max_bindings=64)
    for i in range(3000):
        srv.handle(_client(1, _llt(i.to_bytes(6, "big")), _ia(1), _opt(14)))
    assert len(srv.bindings()) == 64
    assert len(srv._previous) <= dhcpv6.REMEMBERED and len(srv._expiries) <= 2 * 64 + 64


def test_expired_binding_is_reclaimed_and_unbound(server, clock):
    _lease(server)
    clock.now += 7200
    assert server.bindings() == []
    assert [str(b.address) for b in server.unbound] == ["fd00::2"]
    assert _lease(server, MAC_B)[0] == "fd00::2"


def test_solicit_without_ia_na_gets_no_addrs_avail(server):
    reply = server.handle(_client(1, _llt(MAC_A), _opt(25, bytes(12))))    # IA_PD only
    msg_type, _x, opts = _read(reply.payload)
    assert msg_type == dhcpv6.ADVERTISE and _status(opts) == dhcpv6.STATUS_NO_ADDRS_AVAIL


OTHER_SERVER = struct.pack("!HH", 3, 1) + bytes.fromhex("020000000099")


@pytest.mark.parametrize("payload, reason", [
    (b"\x01\x00\x00", "dhcpv6-malformed"),
    (b"\x01\x00\x00\x01" + b"\x00\x01\x00\x10" + bytes(4), "dhcpv6-malformed"),   # overrun
    (b"\x01\x00\x00\x01" + b"\x00\x01\x00", "dhcpv6-malformed"),                 # half header
    (_client(1, _llt(MAC_A), _opt(3, bytes(8))), "dhcpv6-malformed"),            # short IA_NA
    (_client(1, _llt(MAC_A), _opt(3, bytes(12) + _opt(5, bytes(20)))), "dhcpv6-malformed"),
    (_client(1, _llt(MAC_A), _opt(3, bytes(12) + _opt(13, b"\x00"))), "dhcpv6-malformed"),
    (bytes([1, 0, 0, 1]) + _opt(1, _llt(MAC_A)) + _opt(6, b"\x00"), "dhcpv6-malformed"),  # odd ORO
    (bytes([1, 0, 0, 1]) + _opt(1, _llt(MAC_A)) + _opt(8, b"\x00"), "dhcpv6-malformed"),
    (_client(1, b"\x00\x01", _ia(1)), "dhcpv6-malformed"),                        # tiny DUID
    (_client(1, bytes(200), _ia(1)), "dhcpv6-malformed"),                         # huge DUID
    (bytes([12, 0]) + bytes(32), "dhcpv6-relayed"),
    (_client(2, _llt(MAC_A)), "dhcpv6-not-client"),                               # an Advertise
    (_client(7, _llt(MAC_A)), "dhcpv6-not-client"),
    (_client(99, _llt(MAC_A)), "dhcpv6-not-client"),
    (bytes([1, 0, 0, 1]) + _ia(1), "dhcpv6-invalid"),                            # no client id
    (_client(1, _llt(MAC_A), _opt(2, SERVER_DUID), _ia(1)), "dhcpv6-invalid"),   # Solicit + server
    (_client(3, _llt(MAC_A), _ia(1, ["fd00::2"])), "dhcpv6-invalid"),            # no server id
    (_client(6, _llt(MAC_A), _opt(2, SERVER_DUID), _ia(1)), "dhcpv6-invalid"),   # Rebind + server
    (_client(11, _llt(MAC_A), _ia(1)), "dhcpv6-invalid"),                        # Info-Req + IA
    (_client(3, _llt(MAC_A), _opt(2, OTHER_SERVER), _ia(1)), "dhcpv6-other-server"),
])
def test_malformed_or_misdirected_messages_are_dropped_and_counted(server, payload, reason):
    assert server.handle(payload) is None
    assert server.drops == {reason: 1}
    assert server.bindings() == []


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([1, 3, 4, 5, 6, 8, 9, 11, 12]), st.binary(max_size=120))
def test_handle_never_raises(msg_type, tail):
    srv = dhcpv6.Dhcpv6Server(GW_MAC, Clock())
    for payload in (bytes([msg_type]) + tail, _client(msg_type, _llt(MAC_A)) + tail,
                    _client(msg_type, _llt(MAC_A), _opt(3, tail))):
        reply = srv.handle(payload)
        if reply is not None:
            _read(reply.payload)


def test_constructor_refuses_a_pool_outside_the_subnet():
    with pytest.raises(ValueError):
        dhcpv6.Dhcpv6Server(GW_MAC, Clock(), first="fd01::2")
    with pytest.raises(ValueError):
        dhcpv6.Dhcpv6Server(GW_MAC, Clock(), preferred_lifetime=9000, valid_lifetime=100)


def test_duid_helpers():
    assert dhcpv6.duid_mac(_llt(MAC_A)) == MAC_A and dhcpv6.duid_mac(_ll(MAC_B)) == MAC_B
    assert dhcpv6.duid_mac(struct.pack("!HI", 2, 9) + b"x") is None
    assert dhcpv6.duid_ll(GW_MAC) == SERVER_DUID
    assert dhcpv6.duid_llt(MAC_A, 0x2A2B2C2D) == _llt(MAC_A)
