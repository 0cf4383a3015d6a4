"""Every private part of Twisted the stack relies on, one test each.

pyproject.toml pins Twisted to the range these pass on (24.3 and 26.10 were
run). A Twisted release that renames, drops or changes one of these fails
here with the name of the stack code that depends on it, instead of the stack
quietly taking a slower path or misbehaving. The list came from grepping
arcbox_net for private names (``._x``) read on Twisted objects, ``self._x``
inherited from Twisted base classes, overridden private methods, and the
undocumented transport attributes tcp/nat.py reads.

No reactor runs here: transports are built on a socketpair with a
MemoryReactor and driven by hand; the epoll reactor is constructed, never run.
"""

import ast
import hashlib
import inspect
import os
import select
import socket
import textwrap

import pytest

from twisted.internet import abstract, tcp
from twisted.internet.base import ReactorBase
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.names import authority, client, common, dns, server
from twisted.web import http, server as web_server

from arcbox_net.reactor import LeanEPollReactor
from arcbox_net.tcp.nat import _twisted_buffer_empty, _write_host

NAT_WRITE = "arcbox_net/tcp/nat.py (_twisted_buffer_empty, _write_host: the direct sendmsg path)"
NAT_READ = "arcbox_net/tcp/nat.py (TcpSplice.connectionMade sets transport.bufferSize)"
REACTOR = "arcbox_net/reactor.py (LeanEPollReactor.doPoll, a copy of EPollReactor.doPoll)"


def depends(what, where):
    return f"Twisted changed {what}, which {where} relies on: re-read that code"


def body_digest(function):
    """sha256 of a function's syntax tree without its docstring (comments and
    layout do not count)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        tree.body = body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def param_names(function):
    return list(inspect.signature(function).parameters)


# -- the host TCP transport (tcp/nat.py)


class Recorder(Protocol):
    def __init__(self):
        self.received = []

    def dataReceived(self, data):
        self.received.append(data)


@pytest.fixture
def connection():
    """A real twisted.internet.tcp.Connection on one end of a socketpair,
    connected as tcp.Server/Client mark it, with a MemoryReactor."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setblocking(False)
    protocol = Recorder()
    conn = tcp.Connection(ours, protocol, reactor=MemoryReactor())
    conn.connected = 1
    protocol.makeConnection(conn)
    yield conn, peer
    ours.close()
    peer.close()


def drain(peer):
    got = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


def test_write_buffer_attributes_dataBuffer_offset_tempDataBuffer(connection):
    conn, _ = connection
    fd = abstract.FileDescriptor(reactor=MemoryReactor())
    for obj in (fd, conn):
        assert obj.dataBuffer == b"", depends("FileDescriptor.dataBuffer", NAT_WRITE)
        assert obj.offset == 0, depends("FileDescriptor.offset", NAT_WRITE)
        assert obj._tempDataBuffer == [], depends("FileDescriptor._tempDataBuffer", NAT_WRITE)
        assert not obj.disconnecting, depends("FileDescriptor.disconnecting", NAT_WRITE)
        assert obj.disconnected == 0, depends("FileDescriptor.disconnected",
                                              "arcbox_net/protocols/dns.py (_DnsStreamProtocol._reply)")


def test_write_queues_in_tempDataBuffer_until_doWrite(connection):
    conn, peer = connection
    assert _twisted_buffer_empty(conn), depends("the write-buffer attributes", NAT_WRITE)
    conn.write(b"queued")
    assert conn._tempDataBuffer == [b"queued"], depends("FileDescriptor.write", NAT_WRITE)
    assert not _twisted_buffer_empty(conn), depends("FileDescriptor.write", NAT_WRITE)
    conn.doWrite()
    assert drain(peer) == b"queued"
    assert _twisted_buffer_empty(conn), depends("FileDescriptor.doWrite", NAT_WRITE)


def test_a_partial_write_leaves_dataBuffer_and_offset(connection):
    """What the kernel did not take stays in dataBuffer past offset."""
    conn, peer = connection
    conn.write(b"x" * (8 << 20))
    conn.doWrite()
    assert conn._tempDataBuffer == [], depends("FileDescriptor.doWrite", NAT_WRITE)
    assert 0 < conn.offset < len(conn.dataBuffer), depends("FileDescriptor.offset", NAT_WRITE)
    assert not _twisted_buffer_empty(conn), depends("FileDescriptor.offset", NAT_WRITE)
    got = b""
    while not _twisted_buffer_empty(conn):
        got += drain(peer)
        conn.doWrite()
    got += drain(peer)
    assert got == b"x" * (8 << 20)
    assert len(conn.dataBuffer) == conn.offset or not conn.dataBuffer, \
        depends("FileDescriptor.doWrite (dataBuffer fully written)", NAT_WRITE)


def test_connection_socket_is_the_nonblocking_socket(connection):
    conn, peer = connection
    assert isinstance(conn.socket, socket.socket), depends("tcp.Connection.socket", NAT_WRITE)
    assert conn.socket.getblocking() is False, depends("tcp.Connection.socket (non-blocking)",
                                                       NAT_WRITE)
    _write_host(conn, [memoryview(b"straight "), b"to the socket"])
    assert conn._tempDataBuffer == [] and not conn.dataBuffer
    assert drain(peer) == b"straight to the socket", depends("tcp.Connection.socket", NAT_WRITE)


def test_direct_writes_stay_behind_queued_data(connection):
    conn, peer = connection
    conn.write(b"first ")
    _write_host(conn, [memoryview(b"second")])
    assert drain(peer) == b"", depends("FileDescriptor._tempDataBuffer", NAT_WRITE)
    conn.doWrite()
    assert drain(peer) == b"first second", depends("FileDescriptor write ordering", NAT_WRITE)


def test_bufferSize_is_the_read_size_and_the_pause_threshold(connection):
    conn, peer = connection
    conn.bufferSize = 7
    peer.sendall(b"0123456789abcdefghij")
    assert conn.doRead() is None
    assert conn.protocol.received == [b"0123456"], depends("tcp.Connection.doRead's bufferSize",
                                                           NAT_READ)

    class Producer:
        paused = 0

        def pauseProducing(self):
            self.paused += 1

        def resumeProducing(self):
            pass

        def stopProducing(self):
            pass

    producer = Producer()
    conn.registerProducer(producer, True)
    conn.write(b"12345678")
    assert producer.paused == 1, depends("FileDescriptor pausing a producer above bufferSize",
                                         NAT_READ)
    conn.unregisterProducer()


def test_nat_reads_only_these_transport_attributes():
    """A new attribute read in _twisted_buffer_empty needs a test here first."""
    names = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(_twisted_buffer_empty)))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "transport":
            names.add(node.attr)
    assert names == {"dataBuffer", "offset", "_tempDataBuffer", "connected", "disconnecting",
                     "socket"}, names


# -- the epoll reactor (reactor.py)


@pytest.fixture
def epoll_reactor():
    """A LeanEPollReactor, constructed and never run; its fds closed after."""
    reactor = LeanEPollReactor()
    yield reactor
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        if waker.fileno() in reactor._selectables:
            reactor.removeReader(waker)
        waker.connectionLost(None)
    reactor._poller.close()


def test_epoll_doPoll_is_the_version_reactor_py_copies():
    """LeanEPollReactor.doPoll is EPollReactor.doPoll minus log.callWithLogger.
    If Twisted's changes, port the change to the copy, then add its digest."""
    known = {"f57e2c7333740ac9"}  # Twisted 24.3.0 .. 26.10.0
    assert body_digest(EPollReactor.doPoll) in known, depends("EPollReactor.doPoll", REACTOR)
    assert param_names(EPollReactor.doPoll) == ["self", "timeout"], \
        depends("EPollReactor.doPoll's signature", REACTOR)


def test_epoll_doIteration_is_doPoll():
    """The main loop calls doIteration; EPollReactor aliases it to doPoll, so
    the subclass re-aliases its own doPoll."""
    assert EPollReactor.__dict__.get("doIteration") is EPollReactor.__dict__["doPoll"], \
        depends("EPollReactor.doIteration = doPoll", REACTOR)
    assert LeanEPollReactor.doIteration is LeanEPollReactor.doPoll
    mainloop = inspect.getsource(ReactorBase.mainLoop)
    assert "self.doIteration(" in mainloop, depends("ReactorBase.mainLoop calling doIteration",
                                                    REACTOR)


def test_epoll_poller_is_a_select_epoll(epoll_reactor):
    assert isinstance(epoll_reactor._poller, select.epoll), \
        depends("EPollReactor._poller", REACTOR)


def test_epoll_selectables_maps_fds_to_descriptors(epoll_reactor):
    r, w = os.pipe()
    try:
        reader = abstract.FileDescriptor(reactor=epoll_reactor)
        reader.fileno = lambda: r
        reader.doRead = lambda: None
        epoll_reactor.addReader(reader)
        assert epoll_reactor._selectables.get(r) is reader, \
            depends("EPollReactor._selectables", REACTOR)
        epoll_reactor.removeReader(reader)
        assert r not in epoll_reactor._selectables, depends("EPollReactor._selectables", REACTOR)
    finally:
        os.close(r)
        os.close(w)


def test_epoll_doReadOrWrite_disconnects_a_failing_reader(epoll_reactor):
    """reactor.py drops Twisted's per-event wrapper and trusts _doReadOrWrite
    to turn a reader's exception into a logged disconnect."""
    assert param_names(EPollReactor._doReadOrWrite) == ["self", "selectable", "fd", "event"], \
        depends("_doReadOrWrite's signature", REACTOR)
    r, w = os.pipe()
    lost = []
    try:
        reader = abstract.FileDescriptor(reactor=epoll_reactor)
        reader.fileno = lambda: r

        def fail():
            raise RuntimeError("reader bug (expected by this test)")
        reader.doRead = fail
        reader.connectionLost = lost.append
        epoll_reactor.addReader(reader)
        from twisted.python import log
        observed = []
        log.addObserver(observed.append)
        try:
            epoll_reactor._doReadOrWrite(reader, r, select.EPOLLIN)
        finally:
            log.removeObserver(observed.append)
        assert lost and lost[0].check(RuntimeError), depends("_doReadOrWrite's error handling",
                                                             REACTOR)
        assert r not in epoll_reactor._selectables, depends("_doReadOrWrite's error handling",
                                                            REACTOR)
        assert any(e.get("isError") for e in observed)
    finally:
        os.close(r)
        os.close(w)


# -- twisted.names (protocols/dns.py)

DNS = "arcbox_net/protocols/dns.py"


def test_dns_protocol_keeps_its_reactor_as__reactor():
    clock = Clock()
    protocol = dns.DNSProtocol(server.DNSServerFactory(), reactor=clock)
    assert protocol._reactor is clock, depends("DNSMixin._reactor",
                                               f"{DNS} (_DnsStreamProtocol's idle timer)")


def test_resolverbase_dispatches_queries_to__lookup():
    assert param_names(common.ResolverBase._lookup) == ["self", "name", "cls", "type", "timeout"], \
        depends("ResolverBase._lookup's signature", f"{DNS} (UpstreamResolver._lookup)")
    seen = []

    class Resolver(common.ResolverBase):
        def _lookup(self, name, cls, type, timeout):
            seen.append((name, cls, type))
            return None

    Resolver().query(dns.Query(b"example.test", dns.AAAA, dns.IN))
    Resolver().query(dns.Query(b"example.test", 65280, dns.IN))  # a type without a method
    assert seen == [(b"example.test", dns.IN, dns.AAAA), (b"example.test", dns.IN, 65280)], \
        depends("ResolverBase.query -> _lookup", f"{DNS} (UpstreamResolver._lookup)")


def test_fileauthority__lookup_signature():
    assert param_names(authority.FileAuthority._lookup) == \
        ["self", "name", "cls", "type", "timeout"], \
        depends("FileAuthority._lookup's signature", f"{DNS} (LocalAuthority._lookup)")


def test_dnsserverfactory_builds_replies_with__responseFromMessage():
    want = ["self", "message", "rCode", "answers", "authority", "additional"]
    assert param_names(server.DNSServerFactory._responseFromMessage) == want, \
        depends("DNSServerFactory._responseFromMessage's signature",
                f"{DNS} (DnsResolverProxy._responseFromMessage)")
    for name in ("gotResolverResponse", "gotResolverError"):
        source = inspect.getsource(getattr(server.DNSServerFactory, name))
        assert "self._responseFromMessage(" in source, \
            depends(f"DNSServerFactory.{name} building its reply",
                    f"{DNS} (DnsResolverProxy._responseFromMessage sets the AA bit)")


def test_client_resolver__parseCall_is_its_resolv_conf_timer(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    clock = Clock()
    resolver = client.Resolver(resolv=str(resolv), reactor=clock)
    assert resolver._parseCall is not None and resolver._parseCall.active(), \
        depends("client.Resolver._parseCall", f"{DNS} (UpstreamResolver.stop cancels it)")
    assert clock.getDelayedCalls() == [resolver._parseCall]
    assert resolver.connections == [], depends("client.Resolver.connections",
                                               f"{DNS} (UpstreamResolver.stop)")
    resolver._parseCall.cancel()


def test_client_resolver_sends_every_udp_query_through__query():
    """PooledResolver overrides _query (one port per query upstream)."""
    assert param_names(client.Resolver._query) == ["self", "args"], \
        depends("client.Resolver._query(*args)", f"{DNS} (PooledResolver._query)")
    source = inspect.getsource(client.Resolver.queryUDP)
    assert "self._query(" in source, depends("client.Resolver.queryUDP -> _query",
                                            f"{DNS} (PooledResolver._query)")
    assert param_names(dns.DNSDatagramProtocol.query)[:3] == ["self", "address", "queries"], \
        depends("DNSDatagramProtocol.query(address, queries, ...)", f"{DNS} (_QueryPort)")


# -- twisted.web (api.py)


def test_web_request__disconnected_is_set_by_connectionLost():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    assert issubclass(web_server.Request, http.Request)
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    request = http.Request(channel)
    assert request._disconnected is False, depends("http.Request._disconnected",
                                                   "arcbox_net/api.py (_finish)")
    request.connectionLost(Failure(ConnectionDone()))
    assert request._disconnected is True, depends("http.Request._disconnected",
                                                  "arcbox_net/api.py (_finish)")
    channel.connectionLost(Failure(ConnectionDone()))
