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
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata

from .common import REPO

USER = "arcbox-bench"
SCRIPT = os.path.join(os.path.dirname(sys.executable), "arcbox-net-slirp4netns")
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
        self.python, self.script = self._venv(os.path.join(self.base, "venv"))

    def _venv(self, dest):
        """(python, arcbox-net-slirp4netns) of a venv the user can run."""
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", dest], check=True,
                       capture_output=True)
        python = os.path.join(dest, "bin", "python")
        site = subprocess.run([python, "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"], check=True,
                              capture_output=True, text=True).stdout.strip()
        seen = {}

        def walk(name):
            key = re.sub(r"[-_.]+", "-", name).lower()
            if key in seen:
                return
            try:
                seen[key] = dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                return
            for req in dist.requires or []:
                if "extra ==" not in req:
                    walk(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
        walk("arcbox-net")
        ours = sysconfig.get_paths()["purelib"]
        for top in sorted({f.parts[0] for d in seen.values() for f in d.files or []}):
            src = os.path.join(ours, top)
            if top in ("..", "__pycache__") or top.endswith(".pth") or not os.path.exists(src):
                continue
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(site, top), dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, site)
        shutil.copytree(os.path.join(REPO, "arcbox_net"), os.path.join(site, "arcbox_net"),
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        with open(SCRIPT) as f:
            body = f.read().split("\n", 1)[1]
        script = os.path.join(dest, "bin", "arcbox-net-slirp4netns")
        with open(script, "w") as f:
            f.write(f"#!{python}\n{body}")
        os.chmod(script, 0o755)
        return python, script

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
