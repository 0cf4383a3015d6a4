"""arcbox-net-slirp4netns as rootlesskit runs it, unprivileged, beside the real slirp4netns.

Every test runs Debian's rootlesskit as an unprivileged user the test makes
(subuid/subgid, /dev/net/tun mode 0666 as on stock Debian) with
``--net=slirp4netns --slirp4netns-binary=BINARY --port-driver=slirp4netns``,
once with ``arcbox-net-slirp4netns`` and once with the real ``slirp4netns``:
the checks are slirp4netns's behaviour, so both must pass them.

All of it runs inside a fresh network namespace (``ip netns exec``) that has
only lo: the "host" of these tests, whose 127.0.0.1 and ::1 hold the file
servers, the upstream DNS server (its /etc/netns resolv.conf names 127.0.0.1
and ::1, which both stacks read) and the published port. Nothing can leave
the machine, whatever a stack does with --disable-host-loopback; arcbox-net
also runs with ``--deny 0.0.0.0/0 --allow 127.0.0.0/8 --deny ::/0 --allow
::1/128``.

The user cannot run this venv's interpreter (it may live under /root), so
the test makes a venv from Debian's /usr/bin/python3 holding copies of
arcbox-net's runtime dependencies and this tree's arcbox_net, and installs
the console script there from .venv/bin/arcbox-net-slirp4netns with its
shebang pointed at that interpreter.
"""

import contextlib
import grp
import hashlib
import ipaddress
import json
import os
import pathlib
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import namespace, require_root, run
from hostside import HostServer
from uservenv import SCRIPT, make_user_venv

USER = "arcbox-s4nn"
PUBLISHED = 18080
NAME = "dropin.test"
#: The test DNS server's answer (TEST-NET-2: only ever an answer, never a destination).
ANSWER = "198.51.100.7"
PAYLOAD = os.urandom(3 << 20)
SAFE_OPTS = "--deny 0.0.0.0/0 --allow 127.0.0.0/8 --deny ::/0 --allow ::1/128"
CLONE_NEWNET = 0x40000000

CHILD = r'''
import fcntl, hashlib, json, shutil, socket, struct, subprocess, sys, time
file_port, name, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
file_port6 = int(sys.argv[4]) if len(sys.argv) > 4 else 0
out = {}


def fetch(family, addr, port):
    h, n = hashlib.sha256(), 0
    try:
        c = socket.socket(family)
        c.settimeout(20)
        c.connect((addr, port))
        while True:
            data = c.recv(1 << 16)
            if not data:
                break
            h.update(data)
            n += len(data)
        return {"fetch": [h.hexdigest(), n]}
    except OSError as e:
        return {"fetch_error": [type(e).__name__, e.errno, str(e)], "fetched_before_error": n}


def resolve(family, server):
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack("!HH", 1, 1)
    d = socket.socket(family, socket.SOCK_DGRAM)
    d.settimeout(10)
    try:
        d.sendto(q, (server, 53))
        r = d.recv(4096)
        rid, flags, qd, an = struct.unpack_from("!HHHH", r)
        pos, answers = len(q), []
        for _ in range(an):
            pos += 2 if r[pos] & 0xC0 == 0xC0 else r.index(b"\0", pos) + 1 - pos
            rtype, _, _, rdlen = struct.unpack_from("!HHIH", r, pos)
            pos += 10
            if rtype == 1:
                answers.append(socket.inet_ntoa(r[pos:pos + 4]))
            pos += rdlen
        return {"rcode": flags & 15, "answers": answers}
    except OSError as e:
        return {"error": str(e)}


def v6_addresses():
    """tap0's global IPv6 addresses: (address, tentative)."""
    found = []
    with open("/proc/net/if_inet6") as f:
        for line in f:
            addr, _ix, _plen, scope, flags, dev = line.split()
            if dev == "tap0" and scope == "00":
                text = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(addr))
                found.append([text, bool(int(flags, 16) & 0x40)])
    return found


def v6_default_via():
    with open("/proc/net/ipv6_route") as f:
        for line in f:
            dst, plen, _s, _sl, hop, *_rest, dev = line.split()
            if dst == "0" * 32 and plen == "00" and dev == "tap0":
                return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hop))
    return None


with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    try:
        res = fcntl.ioctl(s, 0x8915, struct.pack("16s16x", b"tap0"))
        out["address"] = socket.inet_ntoa(res[20:24])
    except OSError as e:
        out["address"] = str(e)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 80))
srv.listen(4)
if mode == "checks":
    out.update(fetch(socket.AF_INET, "10.0.2.2", file_port))
    out["dns"] = resolve(socket.AF_INET, "10.0.2.3")
if file_port6:
    # SLAAC from the router advertisement: wait for the address to leave
    # duplicate address detection (the stack may start after tap0 is up).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = [a for a, tentative in v6_addresses() if a.startswith("fd00:") and not tentative]
        if ready and v6_default_via():
            break
        time.sleep(0.2)
    v6 = {"default_via": v6_default_via()}
    ping = shutil.which("ping") or "/usr/bin/ping"
    for target in ("fd00::2", "fd00::3"):
        try:
            v6["ping " + target] = subprocess.run([ping, "-6", "-c1", "-W5", target],
                                                  capture_output=True, timeout=30).returncode
        except OSError as e:
            v6["ping " + target] = str(e)
    v6.update(fetch(socket.AF_INET6, "fd00::2", file_port6))
    v6["dns"] = resolve(socket.AF_INET6, "fd00::3")
    out["v6"] = v6
# Every IPv6 address tap0 has by now (tentative ones too: any RA at all makes one).
out["v6_addresses"] = v6_addresses()
print("READY " + json.dumps(out), flush=True)
srv.settimeout(60)
conn, _ = srv.accept()
got = conn.recv(100)
conn.sendall(b"child:" + got)
conn.close()
print("SERVED " + json.dumps({"got": got.decode()}), flush=True)
'''


def _need(tool):
    if shutil.which(tool) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing; scripts/setup.sh should have installed it")
        pytest.skip(f"{tool} is not installed")


def _ensure_subids(path, user):
    with open(path) as f:
        lines = f.read().splitlines()
    if any(line.split(":")[0] == user for line in lines):
        return None
    ends = [int(a) + int(b) for _, a, b in (line.split(":") for line in lines if line.count(":") == 2)]
    start = max([100000, *ends])
    with open(path, "a") as f:
        f.write(f"{user}:{start}:65536\n")
    return f"{user}:{start}:65536"


@pytest.fixture(scope="module")
def rootless():
    """The unprivileged user, its venv and the binaries under test."""
    require_root()
    for tool in ("rootlesskit", "newuidmap", "slirp4netns", "runuser"):
        _need(tool)
    assert os.path.exists(SCRIPT), f"{SCRIPT} is not installed (pip install -e .)"
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", USER])
        created = True
    added = [(p, _ensure_subids(p, USER)) for p in ("/etc/subuid", "/etc/subgid")]
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)
    # Not under pytest's tmp_path: /tmp/pytest-of-root is closed to other users.
    base = pathlib.Path(tempfile.mkdtemp(prefix="arcbox-s4nn-", dir="/tmp"))
    os.chmod(base, 0o755)
    uid, gid = pwd.getpwnam(USER).pw_uid, grp.getgrnam(USER).gr_gid
    try:
        _python, script = make_user_venv(str(base / "venv"))
        child = base / "child.py"
        child.write_text(CHILD)
        child.chmod(0o644)
        yield {"arcbox-net": script, "slirp4netns": shutil.which("slirp4netns"),
               "python": str(base / "venv" / "bin" / "python"), "child": str(child),
               "base": base, "uid": uid, "gid": gid}
    finally:
        end_user_processes(uid)
        shutil.rmtree(base, ignore_errors=True)
        os.chmod("/dev/net/tun", tun_mode)
        if created:
            subprocess.run(["userdel", USER], capture_output=True)
        for path, line in added:
            if line is not None:
                with open(path) as f:
                    kept = [x for x in f.read().splitlines() if x != line]
                with open(path, "w") as f:
                    f.write("".join(x + "\n" for x in kept))


def end_user_processes(uid):
    """SIGKILL every process of the test's user, by pid: all of them are this
    test's (Podman leaves conmon, the container and its network process
    running when ``podman run`` is killed; its pause process outlives all)."""
    for _ in range(50):
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == uid:
                        pids.append(int(entry))
                except OSError:
                    continue
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.1)
    raise AssertionError(f"processes of uid {uid} keep coming back")


def in_netns(ns, fn):
    """Run ``fn`` in a thread that joined netns ``ns`` (sockets it makes stay there)."""
    from arcbox_net.link.tap import _setns
    result = {}

    def work():
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)
        try:
            result["value"] = fn()
        except Exception as e:
            result["error"] = e
    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class DnsServer:
    """Answers A queries for NAME with ANSWER on 127.0.0.1:53 and [::1]:53
    (libslirp sends DNS on fd00::3 to the host's IPv6 nameserver, or ::1
    when resolv.conf names none), NXDOMAIN otherwise; ``queries`` holds
    (name, family) of each."""

    def __init__(self):
        self.socks = []
        self.queries = []
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((addr, 53))
            self.socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def names(self):
        return [name for name, _family in self.queries]

    def _serve(self, sock):
        while True:
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                return
            try:
                end = data.index(b"\0", 12) + 5
                labels, pos = [], 12
                while data[pos]:
                    labels.append(data[pos + 1:pos + 1 + data[pos]].decode().lower())
                    pos += 1 + data[pos]
                name = ".".join(labels)
                self.queries.append((name, "ipv6" if sock.family == socket.AF_INET6 else "ipv4"))
                qid = struct.unpack_from("!H", data)[0]
                if name == NAME:
                    reply = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + data[12:end]
                    reply += struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(ANSWER)
                else:
                    reply = struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + data[12:end]
            except (ValueError, IndexError, struct.error):
                continue
            try:
                sock.sendto(reply, peer)
            except OSError:
                return  # closed at the end of the test

    def close(self):
        for sock in self.socks:
            sock.close()


@contextlib.contextmanager
def host_namespace():
    """The tests' "host": a namespace with lo, the servers on its 127.0.0.1
    (and ::1), and a resolv.conf naming 127.0.0.1 and ::1 for whatever runs
    in it (libslirp serves 10.0.2.3 from the first IPv4 nameserver and
    fd00::3 only from an IPv6 one: without it, DNS on fd00::3 times out)."""
    with namespace("s4nn") as ns:
        etc = f"/etc/netns/{ns}"
        os.makedirs(etc)
        try:
            with open(f"{etc}/resolv.conf", "w") as f:
                f.write("nameserver 127.0.0.1\nnameserver ::1\n")
            server = in_netns(ns, lambda: HostServer(lambda conn: conn.sendall(PAYLOAD)))
            dns = in_netns(ns, DnsServer)
            try:
                yield ns, server, dns
            finally:
                server.close()
                dns.close()
        finally:
            shutil.rmtree(etc, ignore_errors=True)


class Rootlesskit:
    """rootlesskit as the user, in namespace ``ns``, around the child program."""

    def __init__(self, rootless, ns, binary, extra=(), child_args=(), opts=""):
        self.uid = rootless["uid"]
        self.state = rootless["base"] / f"state-{os.getpid()}-{time.monotonic_ns()}"
        self.state.mkdir()
        os.chown(self.state, rootless["uid"], rootless["gid"])
        self.control_api = f"{self.state}/control.sock"
        opts = opts.format(state=self.state)
        self.log_path = self.state.parent / (self.state.name + ".log")
        cmd = ["ip", "netns", "exec", ns, "runuser", "-u", USER, "--",
               "env", f"ARCBOX_NET_SLIRP4NETNS_OPTS={SAFE_OPTS} {opts}", "rootlesskit",
               "--debug", f"--state-dir={self.state}/rk", "--net=slirp4netns",
               f"--slirp4netns-binary={rootless[binary]}", "--port-driver=slirp4netns",
               "-p", f"127.0.0.1:{PUBLISHED}:80/tcp", *extra,
               rootless["python"], rootless["child"], *child_args]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True, cwd="/")
        self.api_socket = f"{self.state}/rk/.s4nn.sock"

    def line(self, prefix, timeout=60):
        """The child's next stdout line starting with ``prefix``, as JSON."""
        import select
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                text = self.proc.stdout.readline()
                if not text:
                    break
                if text.startswith(prefix + " "):
                    return json.loads(text[len(prefix) + 1:])
            elif self.proc.poll() is not None:
                break
        raise AssertionError(f"no {prefix} line from the child; rootlesskit log:\n{self.stderr()}")

    def stderr(self):
        self.log.flush()
        return self.log_path.read_text()

    def close(self):
        # pytest shows a test's stdout when it fails, in full (assertion texts are cut).
        sys.stdout.write(f"rootlesskit --debug log:\n{self.stderr()[-30000:]}\n")
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        end_user_processes(self.uid)
        self.proc.stdout.close()
        self.log.close()


def host_client(ns, message, attempts=40):
    """Connect to the published port in ``ns``; the reply (retried while the
    forward accepts and drops before the child listens)."""
    last = None
    for _ in range(attempts):
        sock = in_netns(ns, socket.socket)
        sock.settimeout(10)
        try:
            sock.connect(("127.0.0.1", PUBLISHED))
            sock.sendall(message)
            reply = b""
            while True:
                data = sock.recv(4096)
                if not data:
                    break
                reply += data
            if reply:
                return reply
            last = "empty reply"
        except OSError as e:
            last = e
        finally:
            sock.close()
        time.sleep(0.25)
    raise AssertionError(f"no reply through the published port: {last}")


BINARIES = ["arcbox-net", "slirp4netns"]


@pytest.mark.parametrize("binary", BINARIES)
def test_rootlesskit_child_network(rootless, binary):
    """The child has .100, fetches from the host's 127.0.0.1 via .2 byte-exact,
    resolves a name on .3, and a host client reaches its port 80."""
    with host_namespace() as (ns, server, dns):
        kit = Rootlesskit(rootless, ns, binary, child_args=[str(server.port), NAME, "checks"])
        try:
            ready = kit.line("READY")
            assert ready["address"] == "10.0.2.100", kit.stderr()
            assert ready.get("fetch") == [hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD)], \
                (ready, kit.stderr())
            assert ready["dns"] == {"rcode": 0, "answers": [ANSWER]}, (ready, kit.stderr())
            assert NAME in dns.names()
            # Without --ipv6 (slirp4netns without -6) no router advertisement
            # comes: tap0 has no address in fd00::/64, not even a tentative one.
            assert not [a for a, _ in ready["v6_addresses"] if a.startswith("fd00:")], ready
            assert host_client(ns, b"hello-from-host") == b"child:hello-from-host"
            assert kit.line("SERVED") == {"got": "hello-from-host"}
            assert kit.proc.wait(30) == 0, kit.stderr()
        finally:
            kit.close()


@pytest.mark.parametrize("binary", BINARIES)
def test_rootlesskit_disable_host_loopback(rootless, binary):
    """With --disable-host-loopback a connection to 10.0.2.2 fails at once
    (refused or unreachable, never the file); the published port still works."""
    with host_namespace() as (ns, server, _dns):
        kit = Rootlesskit(rootless, ns, binary, extra=["--disable-host-loopback"],
                          child_args=[str(server.port), NAME, "checks"])
        try:
            ready = kit.line("READY")
            assert ready["address"] == "10.0.2.100"
            assert "fetch" not in ready, ready
            kind, errno, _text = ready["fetch_error"]
            assert kind in ("ConnectionRefusedError", "OSError"), ready
            assert errno in (111, 101, 113), ready   # ECONNREFUSED, ENETUNREACH, EHOSTUNREACH
            assert server.results == [], "the host server was reached"
            assert host_client(ns, b"still-published") == b"child:still-published"
            assert kit.proc.wait(30) == 0, kit.stderr()
        finally:
            kit.close()


@pytest.mark.parametrize("loopback", [True, False], ids=["host_loopback", "disable_host_loopback"])
@pytest.mark.parametrize("binary", BINARIES)
def test_rootlesskit_ipv6(rootless, binary, loopback):
    """rootlesskit --ipv6 (slirp4netns --enable-ipv6): the child takes a SLAAC
    address in fd00::/64 and a default route via the router's link-local
    address from the RA, fd00::2 and fd00::3 answer ping, a file on the
    host's [::1] comes byte-exact via [fd00::2] (refused at once with
    --disable-host-loopback), and a name resolves on fd00::3."""
    with host_namespace() as (ns, server, dns):
        server6 = in_netns(ns, lambda: HostServer(lambda conn: conn.sendall(PAYLOAD), host="::1"))
        extra = ["--ipv6", *([] if loopback else ["--disable-host-loopback"])]
        kit = Rootlesskit(rootless, ns, binary, extra=extra,
                          child_args=[str(server.port), NAME, "checks", str(server6.port)])
        try:
            ready = kit.line("READY", timeout=120)
            v6 = ready["v6"]
            slaac = [a for a, tentative in ready["v6_addresses"]
                     if ipaddress.IPv6Address(a) in ipaddress.IPv6Network("fd00::/64")
                     and not tentative]
            assert slaac, (ready, kit.stderr())
            # Only SLAAC (rootlesskit configures no IPv6 address): an EUI-64
            # or random interface identifier, never the DHCPv6 fd00::100.
            assert "fd00::100" not in slaac, ready
            # libslirp's router is fe80::2, arcbox-net's fe80::1: the guest
            # takes whichever the RA came from.
            assert v6["default_via"] is not None, ready
            assert ipaddress.IPv6Address(v6["default_via"]).is_link_local, ready
            assert v6["ping fd00::2"] == 0 and v6["ping fd00::3"] == 0, ready
            if loopback:
                assert v6.get("fetch") == [hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD)], \
                    (ready, kit.stderr())
            else:
                assert "fetch" not in v6, ready
                kind, errno, _text = v6["fetch_error"]
                assert kind in ("ConnectionRefusedError", "OSError"), ready
                assert errno in (111, 101, 113), ready  # ECONNREFUSED, ENETUNREACH, EHOSTUNREACH
                assert server6.results == [], "the host server was reached over IPv6"
            assert v6["dns"] == {"rcode": 0, "answers": [ANSWER]}, (ready, kit.stderr())
            assert NAME in dns.names()
            # IPv4 is unchanged beside it.
            assert ready["address"] == "10.0.2.100"
            assert ready["dns"] == {"rcode": 0, "answers": [ANSWER]}, ready
            assert host_client(ns, b"hello-v6") == b"child:hello-v6"
            assert kit.proc.wait(30) == 0, kit.stderr()
        finally:
            server6.close()
            kit.close()


def api_call(ns, path, request, half_close=True):
    def call():
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(request)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                data = s.recv(4096)
                if not data:
                    return reply
                reply += data
    return json.loads(in_netns(ns, call))


def control_get(ns, path, resource):
    """GET ``resource`` from arcbox-net's HTTP control API on unix socket ``path``."""
    def call():
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(f"GET {resource} HTTP/1.0\r\nHost: arcbox\r\n\r\n".encode())
            reply = b""
            while data := s.recv(65536):
                reply += data
            return reply
    head, _, body = in_netns(ns, call).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


@pytest.mark.parametrize("binary", BINARIES)
def test_api_socket_protocol(rootless, binary):
    """slirp4netns's JSON API as rootlesskit's port driver left it: list,
    add, remove and the error replies, the same from both binaries."""
    with host_namespace() as (ns, _server, _dns):
        kit = Rootlesskit(rootless, ns, binary, child_args=["0", NAME, "wait"],
                          opts="--control-api {state}/control.sock")
        try:
            kit.line("READY")
            path = kit.api_socket
            listed = api_call(ns, path, b'{"execute":"list_hostfwd"}')
            first = {"id": 1, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": PUBLISHED,
                     "guest_addr": "10.0.2.100", "guest_port": 80}
            assert listed["entries"] == [first]
            if binary == "arcbox-net":  # the form, beside slirp4netns's own
                assert listed["return"] == {"entries": [first]}
            add = (b'{"execute":"add_hostfwd","arguments":{"proto":"udp","host_addr":'
                   b'"127.0.0.1","host_port":18081,"guest_port":53}}')
            assert api_call(ns, path, add, half_close=False) == {"return": {"id": 2}}
            second = {"id": 2, "proto": "udp", "host_addr": "127.0.0.1", "host_port": 18081,
                      "guest_addr": "10.0.2.100", "guest_port": 53}
            assert api_call(ns, path, b'{"execute":"list_hostfwd"}')["entries"] == [first, second]
            if binary == "arcbox-net":  # the stack's own forwards, in its own API too
                listed = [(f["id"], f["protocol"], f["listen"], f["guest"])
                          for f in control_get(ns, kit.control_api, "/forwards")]
                assert listed == [("1", "tcp", f"127.0.0.1:{PUBLISHED}", "10.0.2.100:80"),
                                  ("2", "udp", "127.0.0.1:18081", "10.0.2.100:53")]
            clash = (b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":'
                     b'"127.0.0.1","host_port":18080,"guest_port":80}}')
            assert api_call(ns, path, clash)["error"]["desc"].startswith(
                "bad request: add_hostfwd: ")
            assert api_call(ns, path, b'{"execute":"remove_hostfwd","arguments":{"id":2}}') \
                == {"return": {}}
            for request, desc in [
                (b'{"execute":"remove_hostfwd","arguments":{"id":7}}',
                 "bad request: remove_hostfwd: bad arguments.id"),
                (b'{"execute":"nope"}', "bad request: unknown execute"),
                (b'{"arguments":{}}', "bad request: no execute found"),
                (b"[1]", "bad request: json_object() failed"),
                (b"garbage", "bad request: cannot parse JSON"),
                (b'{"execute":"add_hostfwd","arguments":{"proto":"sctp","host_port":1,"guest_port":1}}',
                 "bad request: add_hostfwd: bad arguments.proto"),
                (b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":0,"guest_port":1}}',
                 "bad request: add_hostfwd: bad arguments.host_port"),
            ]:
                assert api_call(ns, path, request) == {"error": {"desc": desc}}, request
            assert api_call(ns, path, b'{"execute":"list_hostfwd"}')["entries"] == [first]
            assert host_client(ns, b"via-api") == b"child:via-api"
        finally:
            kit.close()


# -- rootless Podman ----------------------------------------------------------------

PODMAN_CHILD = (
    "ip -4 addr show tap0 | grep inet; "
    "mkdir -p /tmp; {{ wget -q -O /tmp/payload http://10.0.2.2:{port}/payload "
    "&& sha256sum /tmp/payload; }} || echo FETCH-FAILED; "
    "nslookup {name} 10.0.2.3; "
    # Podman passes --enable-ipv6: wait for the SLAAC address to leave DAD.
    "i=0; while [ $i -lt 150 ] && ! ip -6 addr show tap0 | grep 'inet6 fd00:' | grep -qv tentative; "
    "do sleep 0.2; i=$((i+1)); done; ip -6 addr show tap0 | grep inet6; "
    "{{ wget -q -O /tmp/payload6 http://[fd00::2]:{port6}/payload "
    "&& sha256sum /tmp/payload6; }} || echo FETCH6-FAILED; "
    "nslookup {name} fd00::3; "
    "echo child-hello > /tmp/hello; printf '#!/bin/sh\\nread line\\ncat /tmp/hello\\n' > /tmp/reply; "
    "chmod +x /tmp/reply; echo READY; "
    # One connection, then the container ends by itself (a killed one leaves
    # Podman's state behind).
    "exec nc -l -p 80 -e /tmp/reply"
)
APPLETS = ("sh", "ip", "grep", "wget", "sha256sum", "nslookup", "mkdir", "echo", "printf",
           "chmod", "cat", "nc", "sleep")


def http_payload(conn):
    conn.recv(4096)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAYLOAD) + PAYLOAD)


@pytest.fixture(scope="module")
def podman_image(rootless):
    """A busybox-static root filesystem as a tar for ``podman import`` (no
    registry), and a containers.conf per binary naming it network_cmd_path.
    runc, not crun: this machine's cgroups are hybrid, which crun refuses."""
    for tool in ("podman", "runc", "apt-get", "unshare", "nsenter"):
        _need(tool)
    base = rootless["base"] / "podman"
    (base / "image" / "bin").mkdir(parents=True)
    deb_dir = base / "deb"
    deb_dir.mkdir()
    if run(["apt-get", "download", "busybox-static"], check=False, cwd=deb_dir).returncode:
        run(["apt-get", "update", "-qq"], timeout=300)
        run(["apt-get", "download", "busybox-static"], cwd=deb_dir)
    deb = next(deb_dir.glob("busybox-static_*.deb"))
    run(["dpkg-deb", "-x", str(deb), str(deb_dir / "x")])
    shutil.copy2(deb_dir / "x" / "bin" / "busybox", base / "image" / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", base / "image" / "bin" / applet)
    run(["tar", "-C", str(base / "image"), "-cf", str(base / "image.tar"), "."])
    for binary in BINARIES:
        (base / f"containers-{binary}.conf").write_text(
            '[containers]\nnetns = "slirp4netns"\n'
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n'
            f'network_cmd_path = "{rootless[binary]}"\n')
    for path in [base, *base.rglob("*")]:
        os.lchown(path, rootless["uid"], rootless["gid"])
    return base


@contextlib.contextmanager
def podman_session(rootless, base):
    """Podman state of its own for one test (storage, runtime dir, image), so a
    test that fails half-way leaves nothing to the next; every process of the
    user ends with it."""
    # XDG_RUNTIME_DIR holds the API socket: its path must fit a sockaddr_un.
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="s4r", dir="/tmp"))
    home = pathlib.Path(tempfile.mkdtemp(prefix="home-", dir=base))
    (home / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{run_dir}/storage"\ngraphroot = "{home}/storage"\n')
    for path in (run_dir, home, home / "storage.conf"):
        os.lchown(path, rootless["uid"], rootless["gid"])
    os.chmod(run_dir, 0o700)
    os.chmod(home, 0o755)
    session = {"base": base, "env": {"HOME": str(home), "XDG_RUNTIME_DIR": str(run_dir),
                                     "CONTAINERS_STORAGE_CONF": f"{home}/storage.conf"}}
    try:
        podman_cmd(session, "arcbox-net", "import", f"{base}/image.tar", "localhost/arcbox-bb:1",
                   timeout=120)
        # Its pause process keeps the user and mount namespaces of this first
        # command, and with them the /etc/resolv.conf it saw: it ends here, and
        # the test's podman run makes it anew in the test's own.
        end_user_processes(rootless["uid"])
        yield session
    finally:
        end_user_processes(rootless["uid"])
        shutil.rmtree(run_dir, ignore_errors=True)


def podman_cmd(session, binary, *args, ns=None, timeout=60, popen=False):
    env = {**session["env"], "CONTAINERS_CONF": f"{session['base']}/containers-{binary}.conf",
           "ARCBOX_NET_SLIRP4NETNS_OPTS": SAFE_OPTS}
    # Not ``ip netns exec``: it mounts a fresh /sys, which hides the cgroup
    # mounts runc needs. A private mount namespace with only resolv.conf
    # replaced, and the test's network namespace.
    enter = []
    if ns:
        script = (f'mount --bind /etc/netns/{ns}/resolv.conf /etc/resolv.conf; '
                  f'exec nsenter --net=/var/run/netns/{ns} "$@"')
        enter = ["unshare", "--mount", "--propagation=private", "sh", "-ec", script, "sh"]
    cmd = [*enter, "runuser", "-u", USER, "--", "env",
           *(f"{k}={v}" for k, v in env.items()), "podman", *args]
    if popen:
        return cmd
    return run(cmd, timeout=timeout, cwd="/")


@pytest.mark.parametrize("loopback", [True, False], ids=["allow_host_loopback", "default"])
@pytest.mark.parametrize("binary", BINARIES)
def test_podman_run_publish(rootless, podman_image, binary, loopback):
    """``podman run -p`` with network_cmd_path: the container has .100 (set by
    -c), fetches via .2 only with allow_host_loopback=true (Podman passes
    --disable-host-loopback otherwise), resolves on .3, and its port 80 is
    published through the API socket (port_handler=slirp4netns)."""
    with host_namespace() as (ns, _server, dns), podman_session(rootless, podman_image) as pm:
        web = in_netns(ns, lambda: HostServer(http_payload))
        web6 = in_netns(ns, lambda: HostServer(http_payload, host="::1"))
        network = "slirp4netns:port_handler=slirp4netns" + \
            (",allow_host_loopback=true" if loopback else "")
        cmd = podman_cmd(pm, binary, "run", "--rm", "--network", network,
                         "-p", f"127.0.0.1:{PUBLISHED}:80", "localhost/arcbox-bb:1", "sh", "-c",
                         PODMAN_CHILD.format(port=web.port, port6=web6.port, name=NAME), ns=ns,
                         popen=True)
        log = podman_image / f"run-{binary}-{loopback}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                    start_new_session=True, cwd="/")
        try:
            lines = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and "READY" not in lines:
                text = proc.stdout.readline()
                if not text:
                    break
                lines.append(text.strip())
            out = "\n".join(lines)
            assert "READY" in lines, f"{out}\n{log.read_text()}"
            assert "inet 10.0.2.100/24" in out, out
            digest = hashlib.sha256(PAYLOAD).hexdigest()
            # IPv6 (-6): a SLAAC address, [fd00::2] to the host's [::1] with the
            # same loopback rule as .2, and DNS on fd00::3.
            assert re.search(r"inet6 fd00:[0-9a-f:]+/64 scope global", out), out
            if loopback:
                assert f"{digest}  /tmp/payload" in lines, out
                assert f"{digest}  /tmp/payload6" in lines, out
            else:
                assert "FETCH-FAILED" in lines and digest not in out, out
                assert "FETCH6-FAILED" in lines, out
                assert web.results == [] and web6.results == [], "the host server was reached"
            text = out.replace("\t", " ").replace("  ", " ")
            on_v4, _, on_v6 = text.partition("Address: [fd00::3]:53")
            assert f"Address: {ANSWER}" in on_v4 and f"Address: {ANSWER}" in on_v6, out
            assert NAME in dns.names()
            # The request is read before the reply: a guest closing with unread
            # data sends RST, not FIN.
            assert host_client(ns, b"hello\n") == b"child-hello\n"
            assert proc.wait(30) == 0, log.read_text()
        finally:
            web.close()
            web6.close()
            if proc.poll() is None:
                end_user_processes(rootless["uid"])
                proc.wait(10)
            proc.stdout.close()


# -- the process contract: --configure, --macaddress, --ready-fd, --exit-fd ---------


@pytest.mark.parametrize("binary", BINARIES)
def test_configure_ready_and_exit_fds(binary):
    """-c gives the namespace's TAP .100/24, the MAC asked for, the MTU and a
    default route via .2 (and lo up); --ready-fd gets "1" once the API socket
    listens; closing --exit-fd ends the process with status 0 (and the API
    socket file goes). As root with --netns-type=path, as Podman runs it."""
    require_root()
    program = SCRIPT if binary == "arcbox-net" else shutil.which("slirp4netns")
    if program is None:
        _need("slirp4netns")
    with namespace("s4nc") as ns:
        run(["ip", "-n", ns, "link", "set", "lo", "down"])
        base = pathlib.Path(tempfile.mkdtemp(prefix="s4nc-", dir="/tmp"))
        api = str(base / "api.sock")
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        env = {**os.environ, "ARCBOX_NET_SLIRP4NETNS_OPTS": SAFE_OPTS}
        with open(base / "log", "w") as log:
            proc = subprocess.Popen(
                [program, "-c", "--mtu=9000", "--macaddress=02:00:00:ab:cd:ef",
                 f"-r{ready_w}", "-e", str(exit_r), "--api-socket", api,
                 "--netns-type=path", f"/var/run/netns/{ns}", "tap0"],
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(ready_w, exit_r), env=env)
        os.close(ready_w)
        os.close(exit_r)
        try:
            import select
            ready, _, _ = select.select([ready_r], [], [], 30)
            assert ready and os.read(ready_r, 16) == b"1", (base / "log").read_text()
            assert os.path.exists(api)
            link = run(["ip", "-n", ns, "-o", "link", "show", "tap0"]).stdout
            assert "mtu 9000" in link and "02:00:00:ab:cd:ef" in link and ",UP" in link, link
            addr = run(["ip", "-n", ns, "-4", "-o", "addr", "show", "tap0"]).stdout
            assert "inet 10.0.2.100/24" in addr, addr
            route = run(["ip", "-n", ns, "-4", "route", "show", "default"]).stdout
            assert route.startswith("default via 10.0.2.2 dev tap0"), route
            lo = run(["ip", "-n", ns, "-o", "link", "show", "lo"]).stdout
            assert ",UP" in lo, lo
            assert api_call_here(api, b'{"execute":"list_hostfwd"}')["entries"] == []
            os.close(exit_w)
            exit_w = None
            assert proc.wait(20) == 0, (base / "log").read_text()
            assert not os.path.exists(api)
        finally:
            if exit_w is not None:
                os.close(exit_w)
            os.close(ready_r)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            shutil.rmtree(base, ignore_errors=True)


def api_call_here(path, request):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while data := s.recv(4096):
            reply += data
    return json.loads(reply)


@pytest.mark.parametrize("binary", BINARIES)
def test_userns_path_and_netns_path(rootless, binary):
    """``--userns-path=/proc/PID/ns/user --netns-type=path /proc/PID/ns/net``
    (rootlesskit's detached-netns form), as the user, into namespaces the user
    made with unshare: the TAP is created and configured there (-c), and the
    guest fetches from the host's 127.0.0.1 via .2."""
    server = HostServer(lambda conn: conn.sendall(PAYLOAD))
    holder = subprocess.Popen(
        ["runuser", "-u", USER, "--", "unshare", "--user", "--map-root-user", "--net",
         "sh", "-c", "echo $$; exec sleep 120"],
        stdout=subprocess.PIPE, text=True, cwd="/")
    stack = None
    try:
        pid = int(holder.stdout.readline())
        stack = subprocess.Popen(
            ["runuser", "-u", USER, "--", "env", f"ARCBOX_NET_SLIRP4NETNS_OPTS={SAFE_OPTS}",
             rootless[binary], "-c", f"--userns-path=/proc/{pid}/ns/user", "--netns-type=path",
             f"/proc/{pid}/ns/net", "tap0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/")
        inside = ["nsenter", "-t", str(pid), "-n"]
        for _ in range(100):
            addr = run([*inside, "ip", "-4", "-o", "addr", "show", "tap0"], check=False).stdout
            if "10.0.2.100/24" in addr or stack.poll() is not None:
                break
            time.sleep(0.1)
        if "10.0.2.100/24" not in addr:
            stack.kill()
            stack.wait(5)
            pytest.fail(f"no 10.0.2.100 on tap0 ({addr!r}), exit {stack.returncode}:\n"
                        f"{stack.stderr.read()}")
        fetch = run([*inside, "/usr/bin/python3", "-c",
                     "import hashlib, socket\n"
                     f"c = socket.create_connection(('10.0.2.2', {server.port}), timeout=20)\n"
                     "h = hashlib.sha256()\n"
                     "while data := c.recv(65536):\n    h.update(data)\n"
                     "print(h.hexdigest())"], timeout=60)
        assert fetch.stdout.strip() == hashlib.sha256(PAYLOAD).hexdigest()
    finally:
        server.close()
        end_user_processes(rootless["uid"])
        for proc in (holder, stack):
            if proc is not None:
                proc.wait(10)


def test_failures_are_one_line_and_exit_1(rootless):
    """What cannot be done ends arcbox-net-slirp4netns with status 1 and one
    line saying why: a PID that does not exist, and a namespace the user may
    not enter (root's, from the unprivileged user)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    with namespace("s4ne") as ns:
        for argv, why in [
            ([str(gone.pid), "tap0"], f"cannot open network namespace /proc/{gone.pid}/ns/net: "
                                      "No such file or directory"),
            (["--netns-type=path", f"/var/run/netns/{ns}", "tap0"],
             f"cannot enter network namespace /var/run/netns/{ns}: Operation not permitted"),
        ]:
            result = run(["runuser", "-u", USER, "--", rootless["arcbox-net"], *argv],
                         check=False, cwd="/")
            assert result.returncode == 1, result
            assert result.stderr == f"arcbox-net-slirp4netns: {why}\n", result.stderr


def test_tapfd():
    """``--netns-type=tapfd FD`` (slirp4netns 1.3's form; Debian's 1.2 has none,
    so arcbox-net only): a TAP fd the caller opened is served as it is (no
    namespace joined); the guest, configured by hand, fetches via .2."""
    require_root()
    from arcbox_net.link.tap import close_all, open_tap_in_netns
    program = SCRIPT
    server = HostServer(lambda conn: conn.sendall(PAYLOAD))
    with namespace("s4nt") as ns:
        fds, _ = open_tap_in_netns(ns, "tap0", offload=False)
        for args in (["addr", "add", "10.0.2.100/24", "dev", "tap0"],
                     ["route", "add", "default", "via", "10.0.2.2"]):
            run(["ip", "-n", ns, *args])
        ready_r, ready_w = os.pipe()
        env = {**os.environ, "ARCBOX_NET_SLIRP4NETNS_OPTS": SAFE_OPTS}
        proc = subprocess.Popen([program, "-r", str(ready_w), "--netns-type=tapfd", str(fds[0])],
                                pass_fds=(ready_w, fds[0]), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        os.close(ready_w)
        close_all(fds)
        try:
            import select
            ready, _, _ = select.select([ready_r], [], [], 30)
            assert ready and os.read(ready_r, 1) == b"1", proc.stderr
            fetch = run(["ip", "netns", "exec", ns, sys.executable, "-c",
                         "import hashlib, socket\n"
                         f"c = socket.create_connection(('10.0.2.2', {server.port}), timeout=20)\n"
                         "h = hashlib.sha256()\n"
                         "while data := c.recv(65536):\n    h.update(data)\n"
                         "print(h.hexdigest())"], timeout=60)
            assert fetch.stdout.strip() == hashlib.sha256(PAYLOAD).hexdigest()
        finally:
            os.close(ready_r)
            server.close()
            proc.terminate()
            proc.wait(10)
