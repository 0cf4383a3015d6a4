"""What every benchmark module shares: processes, namespaces, /proc figures.

Everything the benchmark starts goes through ``spawn`` or ``run`` and every
namespace through ``netns_add``, so ``cleanup`` can stop each process by its
pid and delete each namespace, on success, on error and on Ctrl-C alike.
"""

import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PYTHON = sys.executable
NETPROG = os.path.join(HERE, "netprog.py")
NOFILE = 20000

_procs = []
_namespaces = []


class Unsupported(Exception):
    """This stack cannot run this workload; the message says why (shown as n/a)."""


def ns_cmd(ns, cmd):
    """``cmd`` run inside namespace ``ns`` (None: the host's namespace)."""
    return list(cmd) if ns is None else ["ip", "netns", "exec", ns, *cmd]


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))


def spawn(cmd, ns=None, log=None, **kwargs):
    """Start a long-running process (server, stack); it is stopped by ``cleanup``."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("stdout", log if log is not None else subprocess.DEVNULL)
    kwargs.setdefault("stderr", subprocess.STDOUT if log is not None else subprocess.DEVNULL)
    proc = subprocess.Popen(ns_cmd(ns, cmd), preexec_fn=_raise_nofile, **kwargs)
    _procs.append(proc)
    return proc


def stop(proc, timeout=5):
    """SIGTERM the process by its pid, SIGKILL if it lingers."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        except ProcessLookupError:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    if proc in _procs:
        _procs.remove(proc)


def run(cmd, ns=None, timeout=60, check=False, input=None):
    """Run a command to completion (killed by pid after ``timeout``); a CompletedProcess.

    A timeout is returned as returncode None with what was read so far.
    """
    proc = subprocess.Popen(ns_cmd(ns, cmd), stdin=subprocess.PIPE if input else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_raise_nofile)
    _procs.append(proc)
    try:
        out, err = proc.communicate(input, timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = None
    except BaseException:                 # Ctrl-C: stop it before going on
        stop(proc, timeout=3)
        raise
    finally:
        if proc in _procs:
            _procs.remove(proc)
    result = subprocess.CompletedProcess(cmd, code, out, err)
    if check and code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {(err or out).strip()[-400:]}")
    return result


def netns_add(name):
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    _namespaces.append(name)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


def netns_attach(name, pid):
    """Name ``pid``'s network namespace (one a process made, e.g. rootlesskit's child)."""
    subprocess.run(["ip", "netns", "attach", name, str(pid)], check=True, capture_output=True)
    _namespaces.append(name)
    return name


def netns_del(name):
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if name in _namespaces:
        _namespaces.remove(name)


def cleanup():
    """Stop everything still running (newest first), then delete the namespaces."""
    for proc in reversed(list(_procs)):
        stop(proc, timeout=3)
    for name in list(_namespaces):
        netns_del(name)


def install_signal_handlers():
    """SIGINT/SIGTERM/SIGHUP raise KeyboardInterrupt, so ``finally: cleanup()`` runs
    (SIGINT too when the shell started us with it ignored, as in the background)."""
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready_fd(read_fd, proc, timeout):
    """Wait for a stack's ready byte on ``read_fd``; True when it came."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([read_fd], [], [], 0.2)
            if readable:
                return os.read(read_fd, 1) == b"1"
            if proc.poll() is not None:
                return False
        return False
    finally:
        os.close(read_fd)


def process_tree(pid):
    """``pid`` and its live descendants (arcbox-net --queues runs worker processes)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def cpu_seconds(pid):
    """User + system CPU seconds of ``pid`` and its children (None without a pid)."""
    if pid is None:
        return None
    ticks = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended between the listing and now
        ticks += int(fields[11]) + int(fields[12])      # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    """Resident memory of ``pid`` and its children."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def open_fds(pid):
    """Open fds of ``pid`` and its children."""
    total = 0
    for p in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


def last_line(text, limit=200):
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""
