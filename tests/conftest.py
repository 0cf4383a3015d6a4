"""Shared fixtures: real guests in network namespaces, stacks run by twistd.

Real-guest tests need root. They skip without it, except under CI=true,
where a skip would hide a broken harness, so they fail instead.
End-to-end tests run the stack as its own twistd process (the product as
users run it), which also keeps blocking guest commands from freezing the
reactor that serves them.
"""

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
UDHCPC_SCRIPT = os.path.join(HERE, "programs", "udhcpc-script.sh")
GUEST_SERVER = os.path.join(HERE, "programs", "tcpserver.py")
GUEST_CLIENT = os.path.join(HERE, "programs", "tcpclient.py")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
_names = itertools.count()


def require_root():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("real-guest tests need root; under CI they may not be skipped")
        pytest.skip("real-guest tests need root")
    for tool in ("ip", "busybox"):
        if shutil.which(tool) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{tool} is missing; .ci/run should have installed it")
            pytest.skip(f"{tool} is not installed")


def run(cmd, check=True, timeout=60, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def in_ns(ns, *cmd, **kwargs):
    return run(["ip", "netns", "exec", ns, *cmd], **kwargs)


@contextlib.contextmanager
def namespace(prefix="abxt"):
    """A fresh network namespace with lo up, removed afterwards."""
    require_root()
    name = f"{prefix}-{os.getpid()}-{next(_names)}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def netns():
    """The guest: a fresh network namespace."""
    with namespace() as name:
        yield name


class StackProcess:
    """``twistd -n arcbox-net ...`` as a child process, ready when it says so."""

    def __init__(self, args, tmp_path, pass_fds=(), prefix=(), twistd_args=(), twistd=TWISTD,
                 cwd=None):
        self.args = list(args)
        self.prefix = list(prefix)
        self.twistd_args = list(twistd_args)
        self.twistd = twistd  # another venv's twistd runs the stack installed there
        self.cwd = cwd
        self.log_path = tmp_path / f"stack-{next(_names)}.log"
        self.proc = None
        self._pass_fds = tuple(pass_fds)

    def start(self, timeout=15):
        ready_r, ready_w = os.pipe()
        log = open(self.log_path, "w")
        cmd = [*self.prefix, self.twistd, "-n", "--pidfile=", *self.twistd_args, "arcbox-net",
               *self.args,
               "--ready-fd", str(ready_w)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     pass_fds=(ready_w, *self._pass_fds), start_new_session=True,
                                     cwd=self.cwd)
        os.close(ready_w)
        log.close()
        try:
            deadline = time.monotonic() + timeout
            import select
            while time.monotonic() < deadline:
                readable, _, _ = select.select([ready_r], [], [], 0.2)
                if readable:
                    if os.read(ready_r, 1) == b"1":
                        return self
                    break
                if self.proc.poll() is not None:
                    break
            raise AssertionError(f"stack did not become ready: {self.args}\n{self.log()}")
        finally:
            os.close(ready_r)

    def log(self):
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def stack_factory(tmp_path):
    """Start stacks with the given CLI args; all are stopped at teardown."""
    started = []

    def start(*args, pass_fds=(), prefix=(), twistd_args=()):
        stack = StackProcess(args, tmp_path, pass_fds=pass_fds, prefix=prefix,
                             twistd_args=twistd_args)
        started.append(stack)
        return stack.start()

    yield start
    for stack in started:
        stack.stop()


@pytest.fixture
def guest_server(netns):
    """Start tests/guest/tcpserver.py in the namespace; killed at teardown."""
    procs = []

    def start(mode, port, *args):
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, GUEST_SERVER, mode,
                                 str(port), *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def guest_tcp_client(ns, *args, timeout):
    """Run tests/programs/tcpclient.py with ``args`` in ``ns``; the JSON it printed last."""
    result = in_ns(ns, sys.executable, GUEST_CLIENT, *map(str, args), timeout=timeout)
    return json.loads(result.stdout.strip().splitlines()[-1])


def udhcpc(ns, record, iface="tap0"):
    """Run busybox udhcpc once in ``ns``; return the recorded lease variables."""
    result = in_ns(ns, "env", f"RECORD={record}", "busybox", "udhcpc", "-i", iface, "-f", "-q",
                   "-n", "-t", "5", "-T", "1", "-s", UDHCPC_SCRIPT, check=False, timeout=30)
    assert result.returncode == 0, f"udhcpc failed:\n{result.stdout}\n{result.stderr}"
    values = {}
    with open(record) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("=")
            values[key] = value
    return values
