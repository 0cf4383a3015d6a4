"""slirp4netns's JSON API over a stack's forwards: the core and one connection."""

import json

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from arcbox_net.slirp4netns.api import (
    MAX_REQUEST,
    REQUEST_WAIT,
    SlirpApi,
    SlirpApiProtocol,
)


class FakeStack:
    """The three forward calls of NetworkStack, answering at once."""

    def __init__(self):
        self.forwards_ = {}
        self.next = 1
        self.fail_with = None

    def add_forward(self, spec):
        if self.fail_with:
            return defer.fail(RuntimeError(self.fail_with))
        proto, bind, port, guest, gport = spec.split(":")
        fid, self.next = str(self.next), self.next + 1
        self.forwards_[fid] = {"id": fid, "protocol": proto, "listen": f"{bind}:{port}",
                               "guest": f"{guest}:{gport}", "guest_address_explicit": True}
        return defer.succeed(self.forwards_[fid])

    def remove_forward(self, fid):
        del self.forwards_[fid]
        return defer.succeed(None)

    def forwards(self):
        return list(self.forwards_.values())


def call(api, request):
    data = request if isinstance(request, bytes) else json.dumps(request).encode()
    return json.loads(api.handle(data).result)


@pytest.fixture
def api():
    return SlirpApi(FakeStack(), "10.0.2.100")


def test_add_list_remove(api):
    add = {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "127.0.0.1",
                                                   "host_port": 8080, "guest_addr": "10.0.2.100",
                                                   "guest_port": 80}}
    assert call(api, add) == {"return": {"id": 1}}
    # No host_addr: 0.0.0.0; no guest_addr: the guest (.100), as slirp4netns.
    assert call(api, {"execute": "add_hostfwd",
                      "arguments": {"proto": "udp", "host_port": 5353, "guest_port": 53}}) \
        == {"return": {"id": 2}}
    assert api.stack.forwards_["1"]["listen"] == "127.0.0.1:8080"
    assert api.stack.forwards_["2"]["listen"] == "0.0.0.0:5353"
    entries = [
        {"id": 1, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": 8080,
         "guest_addr": "10.0.2.100", "guest_port": 80},
        {"id": 2, "proto": "udp", "host_addr": "0.0.0.0", "host_port": 5353,
         "guest_addr": "10.0.2.100", "guest_port": 53},
    ]
    listed = call(api, {"execute": "list_hostfwd"})
    # The issue's {"return": {"entries"}} and slirp4netns 1.2's top-level "entries".
    assert listed == {"return": {"entries": entries}, "entries": entries}
    assert call(api, {"execute": "remove_hostfwd", "arguments": {"id": 1}}) == {"return": {}}
    assert call(api, {"execute": "list_hostfwd"})["entries"] == entries[1:]


def test_forwards_made_elsewhere_are_listed(api):
    # A forward added through arcbox-net's own API is one of the stack's forwards too.
    api.stack.add_forward("tcp:127.0.0.1:2222:10.0.2.100:22")
    assert call(api, {"execute": "list_hostfwd"})["entries"][0]["host_port"] == 2222


@pytest.mark.parametrize("request_, desc", [
    (b"not json", "bad request: cannot parse JSON"),
    (b"[1, 2]", "bad request: json_object() failed"),
    (b'{"arguments": {}}', "bad request: no execute found"),
    (b'{"execute": "quit"}', "bad request: unknown execute"),
    ({"execute": "add_hostfwd", "arguments": {"proto": "sctp", "host_port": 1, "guest_port": 1}},
     "bad request: add_hostfwd: bad arguments.proto"),
    ({"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "::1",
                                              "host_port": 1, "guest_port": 1}},
     "bad request: add_hostfwd: bad arguments.host_addr"),
    ({"execute": "add_hostfwd", "arguments": {"proto": "tcp", "guest_port": 1}},
     "bad request: add_hostfwd: bad arguments.host_port"),
    ({"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": "80", "guest_port": 1}},
     "bad request: add_hostfwd: bad arguments.host_port"),
    ({"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 70000,
                                              "guest_port": 1}},
     "bad request: add_hostfwd: bad arguments.host_port"),
    ({"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 1,
                                              "guest_addr": "x", "guest_port": 1}},
     "bad request: add_hostfwd: bad arguments.guest_addr"),
    ({"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 1}},
     "bad request: add_hostfwd: bad arguments.guest_port"),
    ({"execute": "remove_hostfwd", "arguments": {"id": 9}},
     "bad request: remove_hostfwd: bad arguments.id"),
    ({"execute": "remove_hostfwd"}, "bad request: remove_hostfwd: bad arguments.id"),
    (b"x" * MAX_REQUEST, "bad request: too large message"),
])
def test_errors(api, request_, desc):
    assert call(api, request_) == {"error": {"desc": desc}}


def test_stack_refusal_is_an_error_reply(api):
    api.stack.fail_with = "cannot listen on tcp 127.0.0.1:80: Permission denied"
    reply = call(api, {"execute": "add_hostfwd",
                       "arguments": {"proto": "tcp", "host_port": 80, "guest_port": 80}})
    assert reply == {"error": {"desc": "bad request: add_hostfwd: cannot listen on tcp "
                                       "127.0.0.1:80: Permission denied"}}


def connection(api):
    clock = task.Clock()
    proto = SlirpApiProtocol(api, clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def test_connection_answers_a_complete_request_and_closes(api):
    proto, transport, _clock = connection(api)
    proto.dataReceived(b'{"execute": "list_')
    assert transport.value() == b""
    proto.dataReceived(b'hostfwd"}\n')
    assert json.loads(transport.value())["return"] == {"entries": []}
    assert transport.disconnecting
    proto.dataReceived(b'{"execute": "list_hostfwd"}')   # one request per connection
    assert transport.value().count(b"entries") == 2      # (both forms of the one reply)


def test_connection_answers_at_half_close(api):
    proto, transport, _clock = connection(api)
    proto.dataReceived(b'{"execute": ')
    proto.readConnectionLost()
    assert json.loads(transport.value()) == {"error": {"desc": "bad request: cannot parse JSON"}}
    assert transport.disconnecting


def test_connection_answers_an_unfinished_request_after_a_wait(api):
    proto, transport, clock = connection(api)
    proto.dataReceived(b'{"execute"')
    clock.advance(REQUEST_WAIT)
    assert json.loads(transport.value())["error"]["desc"] == "bad request: cannot parse JSON"
    assert not clock.getDelayedCalls()


def test_connection_closed_early_leaves_no_timer(api):
    proto, _transport, clock = connection(api)
    proto.connectionLost(None)
    assert not clock.getDelayedCalls()
