import ipaddress

import pytest

from arcbox_net.config import ConfigError, StackConfig


def test_defaults_follow_the_arcbox_convention():
    c = StackConfig()
    assert c.subnet == ipaddress.IPv4Network("10.0.2.0/24")
    assert str(c.gateway) == "10.0.2.1" and str(c.guest) == "10.0.2.2"
    assert c.dns_server == c.gateway and c.mtu == 1500
    assert c.owned_addresses == {c.gateway}


@pytest.mark.parametrize("kwargs, message", [
    ({"subnet": "10.0.2.0/33"}, "not an IPv4 network"),
    ({"subnet": "10.0.2.1/24"}, "not an IPv4 network"),
    ({"subnet": "10.0.2.0/31"}, "too small"),
    ({"gateway": "10.0.3.1"}, "gateway 10.0.3.1 is not inside subnet"),
    ({"guest": "10.0.2.255"}, "network or broadcast"),
    ({"guest": "10.0.2.1"}, "guest and gateway are both"),
    ({"mtu": 70000}, "out of range"),
    ({"mtu": 100}, "out of range"),
    ({"lease_time": 0}, "at least 10 seconds"),
    ({"gateway_mac": "01:00:5e:00:00:01"}, "not unicast"),
    ({"gateway_mac": "zz"}, "not a MAC address"),
    ({"static_leases": {"02:00:00:00:00:01": "10.0.9.9"}}, "not a usable address"),
    ({"domain": "has space"}, "not a domain name"),
])
def test_invalid_settings_have_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        StackConfig(**kwargs)


def test_other_subnet_and_static_leases():
    c = StackConfig(subnet="192.168.127.0/24", gateway="192.168.127.1", guest="192.168.127.2",
                    static_leases=[("02-00-00-00-00-01", "192.168.127.50")], mtu=65520)
    assert c.static_leases == ((b"\x02\0\0\0\0\x01", ipaddress.IPv4Address("192.168.127.50")),)


def test_a_config_survives_its_json_form():
    """Queue workers get the stack's configuration as JSON."""
    import json
    config = StackConfig(mtu=9000, search=["x.test"], static_leases={"02:00:00:00:00:09": "10.0.2.9"},
                         address_map=["203.0.113.10=127.0.0.2"], dns_upstreams=["127.0.0.1:5353"],
                         dns_records=["a.test=10.0.2.50"], deny=["0.0.0.0/0"],
                         allow=["127.0.0.0/8"], forwards=["tcp:8080:80", "udp:5000:10.0.2.2:53"])
    assert StackConfig(**json.loads(json.dumps(config.to_json()))) == config


def test_tcp_caps_and_timeouts_from_the_command_line():
    from arcbox_net.cli import Options
    o = Options()
    o.parseOptions(["--netns", "x", "--max-half-open", "16", "--tcp-fin-timeout", "5",
                    "--tcp-close-wait-timeout", "7.5"])
    c = o.config
    assert (c.max_half_open, c.tcp_fin_timeout, c.tcp_close_wait_timeout) == (16, 5.0, 7.5)
    assert c.tcp_timestamps is True
    o = Options()
    o.parseOptions(["--netns", "x", "--no-tcp-timestamps"])
    assert o.config.tcp_timestamps is False
    d = StackConfig()
    assert (d.max_half_open, d.tcp_fin_timeout, d.tcp_close_wait_timeout) == (256, 60.0, 300.0)
    for bad in ({"max_half_open": 0}, {"tcp_fin_timeout": 0}, {"tcp_close_wait_timeout": -1}):
        with pytest.raises(ConfigError):
            StackConfig(**bad)
