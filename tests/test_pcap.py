"""--pcap / NetworkStack.start_capture: frames both ways in a pcap file that
dpkt and tshark read back (tshark without a single warning)."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import dpkt
import pytest
from twisted.internet.testing import MemoryReactorClock

import framebuild as fb
from arcbox_net.config import StackConfig
from arcbox_net.dispatch import FrameDispatcher
from arcbox_net.pcap import PcapCapture
from arcbox_net.stack import NetworkStack
from conftest import HERE, in_ns, udhcpc
from hostside import HostServer, sink_then_reply


CLIENT = os.path.join(HERE, "guest", "tcpclient.py")


class FakeLink:
    description = "fake"
    mtu = 1500

    def __init__(self):
        self.frames = []

    def start(self, sink):
        pass

    def stop(self):
        pass

    def send_frame(self, frame):
        self.frames.append(b"".join(frame) if isinstance(frame, list) else bytes(frame))


def read_pcap(path):
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB
        assert reader.snaplen == 65535
        return [bytes(buf) for _, buf in reader]


def test_capture_writes_frames_readable_while_open(tmp_path):
    path = tmp_path / "c.pcap"
    cap = PcapCapture(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cap.write(fb.arp_request())
    cap.write([b"\x02" * 14, memoryview(b"gathered"), bytearray(b"!")])
    assert read_pcap(path) == [fb.arp_request(), b"\x02" * 14 + b"gathered!"]  # flushed
    cap.close()
    cap.write(b"after close is ignored")
    assert cap.stats() == {"path": str(path), "frames": 2, "bytes": 42 + 23, "active": False}


def test_frames_longer_than_the_snaplen_are_truncated_with_their_length(tmp_path):
    path = tmp_path / "c.pcap"
    cap = PcapCapture(path, snaplen=100)
    cap.write(b"\x01" * 300)
    cap.close()
    with open(path, "rb") as f:
        data = f.read()
    hdr = dpkt.pcap.LEPktHdr(data[24:40]) if data[:4] == b"\xd4\xc3\xb2\xa1" \
        else dpkt.pcap.PktHdr(data[24:40])
    assert (hdr.caplen, hdr.len) == (100, 300)
    assert len(data) == 24 + 16 + 100


def test_write_error_stops_the_capture_not_the_datapath(tmp_path):
    cap = PcapCapture(tmp_path / "c.pcap")

    class Full:
        def write(self, data):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    cap._file = Full()
    cap.write(fb.arp_request())  # logged, capture closed, nothing raised
    assert not cap.active
    cap.write(fb.arp_request())


def test_capture_that_cannot_start_raises(tmp_path):
    with pytest.raises(OSError):
        PcapCapture(tmp_path / "no" / "such" / "dir.pcap")
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError):
            PcapCapture("/dev/full")  # the header's flush fails at once


def test_dispatcher_captures_both_directions():
    link = FakeLink()
    dispatcher = FrameDispatcher(StackConfig(), link)
    seen = []

    class Capture:
        def write(self, frame):
            seen.append(b"".join(frame) if isinstance(frame, list) else bytes(frame))

    dispatcher.capture = Capture()
    dispatcher.frames_received([b"short"])
    dispatcher.send_frame([b"a" * 14, b"b"])
    assert seen == [b"short", b"a" * 14 + b"b"]


def test_network_stack_start_and_stop_capture(tmp_path):
    link = FakeLink()
    stack = NetworkStack(link, StackConfig(dns_upstreams=["127.0.0.1:9"]),
                         reactor=MemoryReactorClock())
    path = tmp_path / "stack.pcap"
    stack.start_capture(path)
    with pytest.raises(RuntimeError, match="already running"):
        stack.start_capture(tmp_path / "second.pcap")
    stack.dispatcher.frames_received([fb.arp_request()])
    assert len(link.frames) == 1  # the ARP reply
    assert stack.stop_capture()["frames"] == 2
    assert stack.stop_capture() is None
    frames = read_pcap(path)
    assert frames == [fb.arp_request(), link.frames[0]]
    stack.dispatcher.frames_received([fb.arp_request()])  # not captured any more
    assert len(read_pcap(path)) == 2
    stack.start_capture(tmp_path / "again.pcap")  # a new capture after a stop
    stack.dispatcher.frames_received([fb.arp_request()])
    stack.stop_capture()
    assert len(read_pcap(tmp_path / "again.pcap")) == 2


# -- a real guest, read back by tshark -------------------------------------------

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
    from test_forward_api import api
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
