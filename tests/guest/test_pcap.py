"""--pcap / NetworkStack.start_capture: frames both ways in a pcap file that
dpkt and tshark read back (tshark without a single warning)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import dpkt
import pytest
from conftest import GUEST_CLIENT, in_ns, udhcpc
from hostside import HostServer, sink_then_reply

CLIENT = GUEST_CLIENT


def read_pcap(path):
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB
        assert reader.snaplen == 65535
        return [bytes(buf) for _, buf in reader]

FIELDS = ["frame.number", "eth.src", "eth.dst", "arp.opcode", "dhcp.option.dhcp", "ip.src",
          "ip.dst", "icmp.type", "tcp.srcport", "tcp.dstport", "tcp.flags.syn",
          "tcp.flags.ack", "dns.flags.response", "dns.qry.name", "dns.a"]


def tshark_fields(path):
    result = subprocess.run(["tshark", "-n", "-r", str(path), "-T", "fields", "-E", "separator=|",
                             "-E", "occurrence=f", *[x for f in FIELDS for x in ("-e", f)]],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # tshark says nothing on stderr for a good file (root gets a "Running as
    # user root" notice from dumpcap's privilege check, which is not about the file).
    complaints = [line for line in result.stderr.splitlines()
                  if line.strip() and "Running as user" not in line]
    assert complaints == [], result.stderr
    rows = []
    for line in result.stdout.splitlines():
        rows.append(dict(zip(FIELDS, line.split("|"))))
    return rows


def test_pcap_of_dhcp_arp_icmp_dns_tcp_read_by_tshark(netns, stack_factory, tmp_path):
    if shutil.which("tshark") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tshark is missing; scripts/setup.sh should have installed it")
        pytest.skip("tshark is not installed")
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # an upstream that never answers: nothing leaves the host
    path = tmp_path / "guest.pcap"
    stack = stack_factory("--netns", netns, "--pcap", str(path), "--deny", "0.0.0.0/0",
                          "--allow", "127.0.0.0/8", "--dns-record", "web.test=10.0.2.1",
                          "--dns-upstream", f"127.0.0.1:{dead.getsockname()[1]}")
    server = HostServer(sink_then_reply)
    try:
        lease = udhcpc(netns, tmp_path / "lease")
        assert lease["ip"] == "10.0.2.2"
        in_ns(netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.0.2.1")
        dig = in_ns(netns, "dig", "+short", "+tries=1", "+time=3", "@10.0.2.1", "web.test", "A")
        assert dig.stdout.split() == ["10.0.2.1"]
        out = in_ns(netns, sys.executable, CLIENT, "send", "10.0.2.1", str(server.port),
                    "100000", "5").stdout
        server.wait()
        assert server.results[0][1] == 100000 and json.loads(out)["reply"].endswith(":100000")

        # Read while the stack still runs: every frame was flushed.
        rows = tshark_fields(path)
    finally:
        server.close()
        dead.close()
    guest_mac = in_ns(netns, "cat", "/sys/class/net/tap0/address").stdout.strip()

    dhcp_types = [r["dhcp.option.dhcp"] for r in rows if r["dhcp.option.dhcp"]]
    assert dhcp_types[:4] == ["1", "2", "3", "5"]  # DISCOVER OFFER REQUEST ACK
    assert any(r["arp.opcode"] == "1" and r["eth.src"] == guest_mac for r in rows)
    assert any(r["arp.opcode"] == "2" and r["eth.dst"] == guest_mac for r in rows)
    assert any(r["icmp.type"] == "8" and r["ip.dst"] == "10.0.2.1" for r in rows)
    assert any(r["icmp.type"] == "0" and r["ip.src"] == "10.0.2.1" for r in rows)
    assert any(r["dns.qry.name"] == "web.test" and r["dns.flags.response"] == "0"
               and r["ip.src"] == "10.0.2.2" for r in rows)
    assert any(r["dns.qry.name"] == "web.test" and r["dns.flags.response"] == "1"
               and r["dns.a"] == "10.0.2.1" and r["ip.dst"] == "10.0.2.2" for r in rows)
    port = str(server.port)
    syn = [r for r in rows if r["tcp.dstport"] == port and r["tcp.flags.syn"] == "1"
           and r["tcp.flags.ack"] == "0"]
    synack = [r for r in rows if r["tcp.srcport"] == port and r["tcp.flags.syn"] == "1"
              and r["tcp.flags.ack"] == "1"]
    assert syn and syn[0]["ip.src"] == "10.0.2.2" and syn[0]["ip.dst"] == "10.0.2.1"
    assert synack and synack[0]["ip.src"] == "10.0.2.1" and synack[0]["ip.dst"] == "10.0.2.2"
    assert int(synack[0]["frame.number"]) > int(syn[0]["frame.number"])

    stack.stop()  # closing the file leaves it as valid as while running
    assert len(tshark_fields(path)) >= len(rows)


def test_control_api_starts_and_stops_a_capture(netns, stack_factory, tmp_path):
    from .test_forward_api import api
    sock = tmp_path / "api.sock"
    pcap = tmp_path / "api.pcap"
    stack_factory("--netns", netns, "--configure", "--deny", "0.0.0.0/0", "--allow",
                  "127.0.0.0/8", "--api", str(sock))
    assert api(sock, "GET", "/capture") == (200, {"active": False})
    assert api(sock, "DELETE", "/capture")[0] == 404
    assert api(sock, "POST", "/capture", {"nope": 1})[0] == 400
    code, started = api(sock, "POST", "/capture", {"path": str(pcap)})
    assert code == 201 and started["active"] and started["path"] == str(pcap)
    assert api(sock, "POST", "/capture", {"path": str(pcap)})[0] == 409
    in_ns(netns, "ping", "-c", "2", "-i", "0.2", "10.0.2.1")
    code, stopped = api(sock, "DELETE", "/capture")
    assert code == 200 and not stopped["active"] and stopped["frames"] >= 4
    frames = [dpkt.ethernet.Ethernet(f) for f in read_pcap(pcap)]
    icmp = [f.data.data for f in frames if isinstance(f.data, dpkt.ip.IP)
            and isinstance(f.data.data, dpkt.icmp.ICMP)]
    assert [m.type for m in icmp][:4] == [8, 0, 8, 0]
    assert api(sock, "GET", "/capture") == (200, {"active": False})


def test_a_capture_fifo_nobody_reads_never_stalls_the_guest(netns, stack_factory, tmp_path):
    """--pcap into a FIFO whose reader never reads: the pipe fills, the
    capture drops frames (counted), and the guest's pings are all answered."""
    from .test_forward_api import api
    fifo = tmp_path / "slow.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sock = tmp_path / "api.sock"
    try:
        stack_factory("--netns", netns, "--configure", "--deny", "0.0.0.0/0", "--allow",
                      "127.0.0.0/8", "--pcap", str(fifo), "--api", str(sock))
        # ~3000 x 1.4 KB each way: far more than the pipe and the capture buffer hold.
        in_ns(netns, "ping", "-f", "-c", "3000", "-s", "1400", "-W", "1", "10.0.2.1",
              timeout=120, check=False)
        out = in_ns(netns, "ping", "-c", "5", "-i", "0.2", "-W", "2", "10.0.2.1", timeout=60)
        assert " 0% packet loss" in out.stdout
        code, capture = api(sock, "GET", "/capture")
        assert code == 200 and capture["active"] and capture["dropped"] > 0
    finally:
        os.close(reader)
