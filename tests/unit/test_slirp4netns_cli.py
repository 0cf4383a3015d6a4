"""arcbox-net-slirp4netns's command line: slirp4netns 1.2's options and address plan."""

import ctypes
import ipaddress
import os

import pytest

from arcbox_net.slirp4netns import cli, nsjoin
from arcbox_net.slirp4netns.cli import UsageError, parse_args, stack_config


def parse(*argv, env=None):
    return parse_args(list(argv), environ=env or {})


def test_rootlesskit_command_line():
    # What rootlesskit 1.1 runs (field notes), in both option spellings.
    for argv in (["--mtu", "65520", "-r", "3", "--disable-host-loopback", "--api-socket",
                  "/run/s.sock", "4242", "tap0"],
                 ["--mtu=65520", "-r3", "--disable-host-loopback", "--api-socket=/run/s.sock",
                  "4242", "tap0"]):
        o = parse(*argv)
        assert (o.mtu, o.ready_fd, o.disable_host_loopback, o.api_socket) == \
            (65520, 3, True, "/run/s.sock")
        assert (o.target_pid, o.tap_name, o.netns_path) == (4242, "tap0", None)


def test_podman_command_line(tmp_path):
    ns = tmp_path / "netns"
    ns.touch()
    o = parse("--disable-host-loopback", "--mtu=65520", "--enable-sandbox", "--enable-seccomp",
              "--enable-ipv6", "-c", "-r", "3", "-e", "4", "--netns-type=path", str(ns), "tap0")
    assert o.configure and o.enable_sandbox and o.enable_seccomp and o.enable_ipv6
    assert (o.exit_fd, o.ready_fd, o.netns_path, o.target_pid) == (4, 3, str(ns), None)
    # Each accepted-but-inert option says so once in the log; -6 is not one.
    assert not any("IPv6" in n or "ipv6" in n for n in o.notes)
    assert any("--enable-sandbox" in n for n in o.notes)
    assert any("--enable-seccomp" in n for n in o.notes)


def test_clustered_short_options_and_operands_anywhere():
    o = parse("-c6", "123", "-m", "9000", "tap1", "--disable-dns")
    assert o.configure and o.enable_ipv6 and o.disable_dns
    assert (o.mtu, o.target_pid, o.tap_name) == (9000, 123, "tap1")


def test_help_and_version_win():
    assert parse("-h").action == "help"
    assert parse("--version").action == "version"


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1", "tap0"], "--bogus"),
    (["-x", "1", "tap0"], "-x"),
    ([], "missing operand"),
    (["123"], "TAPNAME"),
    (["abc", "tap0"], "PID must be a positive integer"),
    (["0", "tap0"], "PID must be a positive integer"),
    (["-r", "x", "1", "tap0"], "ready-fd must be a non-negative integer"),
    (["-e", "-1", "1", "tap0"], "exit-fd must be a non-negative integer"),
    (["-m", "big", "1", "tap0"], "MTU must be a positive integer"),
    (["--netns-type=path", "/nonexistent/ns", "tap0"], "existing path expected"),
    (["--netns-type=bogus", "1", "tap0"], "--netns-type must be"),
    (["--userns-path=/nonexistent/user", "1", "tap0"], "userns path doesn't exist"),
    (["--macaddress=02:00:00:00:00:01", "1", "tap0"], "--macaddress cannot be specified"),
    (["-c", "--macaddress=zz", "1", "tap0"], "is not a MAC address"),
    (["--target-type=bess", "/tmp/bess"], "not supported"),
    (["--mtu"], "requires argument"),
])
def test_bad_command_lines(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse(*argv)


def test_tapfd_needs_no_tap_name():
    o = parse("--netns-type=tapfd", "5")
    assert (o.tap_fd, o.tap_name, o.target_pid) == (5, None, None)


def test_extra_options_from_the_environment():
    env = {cli.ENV_OPTS: "--deny 0.0.0.0/0 --allow=127.0.0.0/8 --dns-record db.test=10.0.2.9"}
    o = parse("--deny", "192.0.2.0/24", "1", "tap0", env=env)
    assert o.deny == ("0.0.0.0/0", "192.0.2.0/24")
    assert o.allow == ("127.0.0.0/8",)
    assert o.dns_records == ("db.test=10.0.2.9",)


def test_unparsable_environment_options_are_one_line():
    with pytest.raises(UsageError, match=f"{cli.ENV_OPTS}: No escaped character"):
        parse("1", "tap0", env={cli.ENV_OPTS: "--deny 0.0.0.0/0\\"})


def test_slirp4netns_address_plan():
    config = stack_config(parse("1", "tap0"))
    assert str(config.subnet) == "10.0.2.0/24"
    assert (str(config.gateway), str(config.dns_server), str(config.guest)) == \
        ("10.0.2.2", "10.0.2.3", "10.0.2.100")
    assert config.host_loopback and config.mtu == 1500
    # The DNS address is the stack's (ARP, ICMP, DNS), as the gateway is.
    assert {str(a) for a in config.owned_addresses} == {"10.0.2.2", "10.0.2.3"}
    # The virtual network is never sent on to a same-numbered host network.
    assert ipaddress.IPv4Network("10.0.2.0/24") in config.deny


def test_cidr_and_disable_host_loopback():
    config = stack_config(parse("--cidr=10.8.0.0/16", "--disable-host-loopback", "1", "tap0"))
    assert (str(config.gateway), str(config.dns_server), str(config.guest)) == \
        ("10.8.0.2", "10.8.0.3", "10.8.0.100")
    assert not config.host_loopback


def test_no_ipv6_without_dash_6():
    # slirp4netns without -6 gives the namespace no IPv6 at all: no RA, no
    # NDP, no DHCPv6 (the stack drops IPv6 frames).
    config = stack_config(parse("1", "tap0"))
    assert config.ipv6 is False
    assert "no ipv6" in config.summary()


@pytest.mark.parametrize("flag", ["-6", "--enable-ipv6"])
def test_ipv6_plan_with_dash_6(flag):
    config = stack_config(parse(flag, "1", "tap0"))
    assert config.ipv6 is True
    assert str(config.ipv6_subnet) == "fd00::/64"
    assert (str(config.gateway6), str(config.dns6), str(config.guest6)) == \
        ("fd00::2", "fd00::3", "fd00::100")
    # The stack answers NDP and echo for the host and the DNS address, as
    # libslirp does (its router's link-local address may differ: a guest
    # takes whichever the RA comes from).
    assert {ipaddress.IPv6Address("fd00::2"), ipaddress.IPv6Address("fd00::3")} <= \
        config.owned_addresses6
    assert config.host_loopback
    # IPv4 is unchanged by -6.
    assert (str(config.gateway), str(config.dns_server), str(config.guest)) == \
        ("10.0.2.2", "10.0.2.3", "10.0.2.100")


def test_dash_6_with_disable_host_loopback_closes_both_families():
    from arcbox_net.policy import NO_ROUTE, Egress
    config = stack_config(parse("-6", "--disable-host-loopback", "1", "tap0"))
    assert not config.host_loopback
    egress = Egress(config, ipv6_loopback=True)
    assert egress.route(ipaddress.IPv6Address("fd00::2").packed, 8080) is NO_ROUTE
    assert egress.route(ipaddress.IPv4Address("10.0.2.2").packed, 8080) is NO_ROUTE
    # And open without the option: fd00::2 is the host's loopback.
    open_egress = Egress(stack_config(parse("-6", "1", "tap0")), ipv6_loopback=True)
    assert open_egress.route(ipaddress.IPv6Address("fd00::2").packed, 8080) == ("::1", 8080)


def test_dash_6_with_v6_policy_from_the_environment():
    env = {cli.ENV_OPTS: "--deny 0.0.0.0/0 --allow 127.0.0.0/8 --deny ::/0 --allow ::1/128"}
    config = stack_config(parse("-6", "1", "tap0", env=env))
    assert ipaddress.IPv6Network("::/0") in config.deny
    assert ipaddress.IPv6Network("::1/128") in config.allow


def test_help_describes_dash_6(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "not provided" not in out
    assert "fd00::2" in out and "fd00::3" in out


@pytest.mark.parametrize("cidr, message", [
    ("10.0.2.100/24", "CIDR needs to be a network address"),
    ("10.0.2.0/26", "prefix length needs to be 1-25"),
    ("nonsense", "invalid CIDR"),
])
def test_bad_cidr(cidr, message):
    with pytest.raises(UsageError, match=message):
        stack_config(parse(f"--cidr={cidr}", "1", "tap0"))


def test_mtu_out_of_the_stacks_range_is_one_line():
    with pytest.raises(UsageError, match="mtu 65521 is out of range"):
        stack_config(parse("-m", "65521", "1", "tap0"))


def test_main_unknown_option_exits_1_with_one_line(capsys):
    assert cli.main(["--frobnicate", "1", "tap0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("arcbox-net-slirp4netns: ")


def test_main_closed_fd_is_one_line(capsys):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert cli.main(["-r", str(r), "1", "tap0"]) == 1
    assert capsys.readouterr().err == f"arcbox-net-slirp4netns: ready-fd {r} is not an open fd\n"


def test_help_names_what_rootlesskit_and_podman_look_for(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    # rootlesskit's DetectFeatures greps `--help` for these.
    for option in ("--netns-type", "--enable-ipv6", "--cidr", "--disable-host-loopback",
                   "--api-socket", "--enable-sandbox", "--enable-seccomp", "--mtu",
                   "--userns-path", "--disable-dns", "--macaddress", "--outbound-addr",
                   "--outbound-addr6", "--exit-fd", "--ready-fd", "--configure"):
        assert option in out, option
    assert "does nothing here" in out  # what sandbox and seccomp do here


def test_version_names_arcbox_net(capsys):
    assert cli.main(["-v"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "arcbox-net" in first and "version" in first


def test_default_route_ioctl_layout():
    # struct rtentry on LP64 Linux is 120 bytes; the sockaddrs keep their
    # zero bytes (a c_char array would stop at the first NUL).
    assert ctypes.sizeof(nsjoin._Rtentry) == (120 if ctypes.sizeof(ctypes.c_void_p) == 8 else 68)
    rt = nsjoin._Rtentry()
    rt.rt_gateway = nsjoin._sockaddr_in("10.0.2.2")
    raw = bytes(rt)
    gateway = raw[nsjoin._Rtentry.rt_gateway.offset:][:16]
    assert gateway == b"\x02\x00\x00\x00\x0a\x00\x02\x02" + bytes(8)
