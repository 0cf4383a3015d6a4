"""``--queues N``: a multi-queue TAP served by worker processes.

Unit tests cover the message framing and which frames a worker keeps; the
real-guest tests run ``twistd arcbox-net --queues 2`` against a namespace's
own TCP stack, with loopback peers.
"""


import dpkt
import pytest
from framebuild import GATEWAY_IP, GUEST_IP, arp_request, ip4, tcp, udp

from arcbox_net import StackConfig
from arcbox_net.multiqueue.messages import RELAY, SNAPSHOT, MessageReader, encode
from arcbox_net.multiqueue.worker import QueueDispatcher


def test_messages_come_out_whole_however_the_stream_is_cut():
    messages = [(RELAY, b"\x01" * 1500), (SNAPSHOT, b"{}"), (RELAY, b"")]
    stream = b"".join(encode(kind, payload) for kind, payload in messages)
    for cut in (1, 3, 5, 7, 100, len(stream)):
        reader = MessageReader()
        got = []
        for i in range(0, len(stream), cut):
            got += reader.feed(stream[i:i + cut])
        assert got == messages


def test_a_length_out_of_range_is_refused():
    with pytest.raises(ValueError):
        MessageReader().feed(b"\x00\x00\x00\x00Y")
    with pytest.raises(ValueError):
        MessageReader().feed(b"\x7f\xff\xff\xffY")


def test_a_worker_keeps_guest_syns_and_its_connections_and_relays_the_rest():
    dispatcher = QueueDispatcher(StackConfig())
    relayed = []
    dispatcher.relay = relayed.append
    known = (ip4(GUEST_IP), 40001, ip4(GATEWAY_IP), 80)
    dispatcher.tcp_connections = {known: object()}
    syn = tcp(40000, 80)
    ours = tcp(40001, 80, flags=dpkt.tcp.TH_ACK, payload=b"data")
    stranger = tcp(40002, 80, flags=dpkt.tcp.TH_ACK, payload=b"data")
    syn_ack = tcp(8000, 50000, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK)
    dns = udp(5353, 53, b"query")
    arp = arp_request()
    dispatcher.frames_received([syn, ours, stranger, syn_ack, dns, arp, b"\x00" * 20])
    assert relayed == [stranger, syn_ack, dns, arp, b"\x00" * 20]
    # The two it kept went to its own handlers (none here: dropped and counted).
    assert dispatcher.frames_in == 2 and dispatcher.relayed == 5
    assert dispatcher.drops["no-handler-ip-proto-6"] == 2


@pytest.mark.parametrize("args, message", [
    (["--netns", "x", "--queues", "0"], "--queues takes 1..16, not 0"),
    (["--netns", "x", "--queues", "17"], "--queues takes 1..16, not 17"),
    (["--netns", "x", "--queues", "two"], "--queues takes a whole number"),
    (["--listen-dgram", "/tmp/x.sock", "--queues", "2"], "--queues needs a TAP link"),
])
def test_bad_queue_options_are_one_line_errors(args, message, capsys):
    from arcbox_net.cli import Options
    with pytest.raises(SystemExit) as exit:
        Options().parseOptions(args)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
