"""The unprivileged user the rootlesskit stacks run as, made once per bench run.

rootlesskit (and so slirp4netns, or arcbox-net-slirp4netns in its place) is
run rootless, as Docker's rootless mode runs it: a user of its own with
subuid/subgid ranges, /dev/net/tun mode 0666 as on stock Debian, and a venv
of Debian's /usr/bin/python3 it can run (this tree's .venv interpreter may
live under /root, closed to other users) holding arcbox-net, its runtime
dependencies and the console script. ``close`` undoes all of it; the user
is not the drop-in test's, so the two never end each other's processes.
"""

import atexit
import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

from .common import REPO

sys.path.insert(0, os.path.join(REPO, "tests"))
from uservenv import make_user_venv  # noqa: E402  (shared with the drop-in test)

USER = "arcbox-bench"
_user = None


def user():
    """The user, made on first use and removed when the bench exits."""
    global _user
    if _user is None:
        _user = RootlessUser()
        atexit.register(_user.close)
    return _user


def _add_subids(path, name):
    with open(path) as f:
        lines = f.read().splitlines()
    if any(line.split(":")[0] == name for line in lines):
        return None
    ends = [int(a) + int(b) for _, a, b in (x.split(":") for x in lines if x.count(":") == 2)]
    line = f"{name}:{max([100000, *ends])}:65536"
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


def _drop_line(path, line):
    with open(path) as f:
        kept = [x for x in f.read().splitlines() if x != line]
    with open(path, "w") as f:
        f.write("".join(x + "\n" for x in kept))


class RootlessUser:
    def __init__(self):
        for tool in ("rootlesskit", "newuidmap", "runuser"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (Debian rootlesskit, uidmap)")
        self.created = False
        try:
            pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", USER], check=True,
                           capture_output=True)
            self.created = True
        self.uid, self.gid = pwd.getpwnam(USER).pw_uid, grp.getgrnam(USER).gr_gid
        self.added = [(p, _add_subids(p, USER)) for p in ("/etc/subuid", "/etc/subgid")]
        self.tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
        self.open_tun()
        self.base = tempfile.mkdtemp(prefix="arcbox-bench-rk-", dir="/tmp")
        os.chmod(self.base, 0o755)
        self.python, self.script = make_user_venv(os.path.join(self.base, "venv"))

    def open_tun(self):
        """/dev/net/tun mode 0666, as stock Debian has it: set again before each
        stack, since a test beside the bench (the drop-in test) restores its own
        saved mode when it ends."""
        os.chmod("/dev/net/tun", 0o666)

    def state_dir(self, tag):
        path = os.path.join(self.base, f"{tag}-{time.monotonic_ns()}")
        os.mkdir(path)
        os.chown(path, self.uid, self.gid)
        return path

    def end_processes(self):
        """SIGKILL every process of the user, by pid: all are the bench's."""
        for _ in range(50):
            pids = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError):
                        if os.stat(f"/proc/{entry}").st_uid == self.uid:
                            pids.append(int(entry))
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            time.sleep(0.1)
        raise RuntimeError(f"processes of uid {self.uid} keep coming back")

    def close(self):
        with contextlib.suppress(Exception):
            self.end_processes()
        shutil.rmtree(self.base, ignore_errors=True)
        os.chmod("/dev/net/tun", self.tun_mode)
        if self.created:
            subprocess.run(["userdel", USER], capture_output=True)
        for path, line in self.added:
            if line is not None:
                _drop_line(path, line)
