"""A wheel built from the tree installs into a fresh venv and serves a guest.

The editable install of scripts/setup.sh runs the source tree, so it hides a
module the wheel leaves out (as arcbox_net.tcp once was). Here a wheel is
built from a copy of the tree, installed in a clean venv (no system site
packages; pip fetches the runtime dependencies), and everything runs from a
directory with no source tree on sys.path: every module the installed
package has imports, ``twistd arcbox-net --help`` works, and the venv's twistd
serves a namespace guest (DHCP lease, ping, TCP both ways). First without
numpy, the pure-Python checksum path; then ``pip install 'WHEEL[fast]'``
brings numpy, and the stack serves the guest with it.

One venv for the module: the tests run in order and the last one adds numpy.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import (REPO, StackProcess, guest_tcp_client, in_ns, namespace, require_root, run,
                      udhcpc)
from hostside import HostServer, sender, sink_then_reply
from tcpclient import data_chunks

# Not the tree, its build output or anything Python or twistd wrote in it.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                     "__pycache__", ".pytest_cache", "dropin.cache")

IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import arcbox_net
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
failed, names = {}, []
for info in pkgutil.walk_packages(arcbox_net.__path__, "arcbox_net.",
                                  onerror=lambda name: failed.setdefault(name, "walk")):
    names.append(info.name)
    if info.name.rpartition(".")[2] == "__main__":
        continue  # ``python -m`` entry points run their program when imported
    try:
        importlib.import_module(info.name)
    except Exception as e:
        failed[info.name] = f"{type(e).__name__}: {e}"
from arcbox_net.wire import checksum
print(json.dumps({"file": arcbox_net.__file__, "path": sys.path, "modules": names,
                  "failed": failed, "numpy": checksum._np is not None,
                  "plugins": sorted(p.tapname for p in getPlugins(IServiceMaker))}))
"""


class Installed:
    """The wheel, the venv it is installed in, and an empty directory to run from."""

    def __init__(self, root):
        self.root = root
        self.src = root / "src"
        self.wheelhouse = root / "wheelhouse"
        self.venv = root / "venv"
        self.cwd = root / "run"
        self.wheel = None

    @property
    def python(self):
        return str(self.venv / "bin" / "python")

    @property
    def twistd(self):
        return str(self.venv / "bin" / "twistd")

    def env(self):
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def run(self, *cmd, timeout=120):
        return run(list(cmd), cwd=self.cwd, env=self.env(), timeout=timeout)

    def pip_install(self, *requirements):
        self.run(self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 *requirements, timeout=600)

    def probe(self):
        return json.loads(self.run(self.python, "-c", IMPORT_ALL).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    inst = Installed(tmp_path_factory.mktemp("packaging"))
    shutil.copytree(REPO, inst.src, ignore=_NOT_SOURCE)
    inst.cwd.mkdir()
    # The dev venv's setuptools builds it (the test extra has it): no build isolation.
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "-w", str(inst.wheelhouse), str(inst.src)],
        timeout=300)
    wheels = list(inst.wheelhouse.glob("arcbox_net-*.whl"))
    assert len(wheels) == 1, wheels
    inst.wheel = wheels[0]
    run([sys.executable, "-m", "venv", str(inst.venv)], timeout=120)
    assert "include-system-site-packages = false" in (inst.venv / "pyvenv.cfg").read_text()
    inst.pip_install(str(inst.wheel))
    return inst


def test_the_wheel_holds_every_module_of_the_tree_and_the_plugin(installed):
    tree = {os.path.relpath(os.path.join(d, f), installed.src)
            for d, _, files in os.walk(installed.src / "arcbox_net") for f in files
            if f.endswith(".py")}
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
    assert tree and tree <= names, sorted(tree - names)
    assert "twisted/plugins/arcbox_net_plugin.py" in names
    assert not any(n.endswith("dropin.cache") or "__init__.py" in n and n.startswith("twisted/")
                   for n in names), sorted(n for n in names if n.startswith("twisted/"))
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(installed.wheel) as whl:
        requires = [line for line in whl.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist: numpy")]
    assert requires and all('extra == "fast"' in line for line in requires), requires


def test_every_module_imports_from_the_venv_without_the_tree(installed):
    seen = installed.probe()
    assert seen["file"].startswith(str(installed.venv)), seen["file"]
    assert not [p for p in seen["path"] if p == REPO or p.startswith(REPO + os.sep)], seen["path"]
    assert not seen["failed"], seen["failed"]
    # Every module of the installed package was walked (not a list kept by hand).
    site = os.path.dirname(os.path.dirname(seen["file"]))
    on_disk = set()
    for d, _, files in os.walk(os.path.join(site, "arcbox_net")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), site)[:-3].replace(os.sep, ".")
                on_disk.add(rel.removesuffix(".__init__"))
    assert on_disk - {"arcbox_net"} == set(seen["modules"]), on_disk ^ set(seen["modules"])
    assert "arcbox_net.tcp.nat" in seen["modules"]
    assert "arcbox-net" in seen["plugins"]
    assert seen["numpy"] is False  # the plain install has no numpy: the pure-Python checksum


def test_twistd_help_from_the_venv(installed):
    out = installed.run(installed.twistd, "arcbox-net", "--help").stdout
    assert "--netns=" in out and "--deny=" in out


def serve_a_guest(installed, tmp_path, monkeypatch):
    """The venv's twistd serves a namespace guest: lease, ping, 2 MiB each way.

    No offload and a 9000-byte MTU, so the stack computes every TCP checksum
    itself over segments above 4 KiB (numpy's range when it is installed) and
    the guest kernel checks them."""
    require_root()
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with namespace("abxpkg") as ns:
        stack = StackProcess(["--netns", ns, "--mtu", "9000", "--no-offload",
                              "--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8"],
                             tmp_path, twistd=installed.twistd, cwd=installed.cwd)
        stack.start()
        try:
            lease = udhcpc(ns, tmp_path / "lease")
            assert lease["ip"] == "10.0.2.2" and lease["mtu"] == "9000"
            out = in_ns(ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.1").stdout
            assert "3 packets transmitted, 3 received" in out
            total = 2 << 20
            down = HostServer(sender(lambda: data_chunks(total, 14)))
            up = HostServer(sink_then_reply)
            try:
                got = guest_tcp_client(ns, "recv", "10.0.2.1", down.port, timeout=120)
                down.wait()
                assert not down.errors and got == {"sha256": down.results[0], "bytes": total}
                sent = guest_tcp_client(ns, "send", "10.0.2.1", up.port, total, 15, timeout=120)
                assert sent["reply"] == f"{sent['sent_sha256']}:{total}"
            finally:
                down.close()
                up.close()
            assert stack.proc.poll() is None, stack.log()
        finally:
            stack.stop()
        log = stack.log()
        assert "Traceback" not in log, log
        return log


def test_a_stack_from_the_venv_serves_a_guest_without_numpy(installed, tmp_path, monkeypatch):
    assert installed.probe()["numpy"] is False
    serve_a_guest(installed, tmp_path, monkeypatch)


def test_the_fast_extra_brings_numpy_and_the_guest_is_served_with_it(installed, tmp_path,
                                                                      monkeypatch):
    installed.pip_install(f"{installed.wheel}[fast]")
    seen = installed.probe()
    assert seen["numpy"] is True and not seen["failed"]
    # A 64 KiB sum in the venv takes the numpy path and matches a word-by-word sum here.
    check = ("import random; from arcbox_net.wire import checksum as c; "
             "d = random.Random(3).randbytes(65536); "
             "print(c.ones_sum(d), c._numpy_sum(d) == c.ones_sum(d), c._np.__file__)")
    total, same, numpy_file = installed.run(installed.python, "-c", check).stdout.split()
    assert same == "True" and numpy_file.startswith(str(installed.venv))
    data = next(data_chunks(65536, 3))  # the same bytes: one chunk of Random(3)
    want = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while want > 0xFFFF:
        want = (want & 0xFFFF) + (want >> 16)
    assert int(total) == want
    serve_a_guest(installed, tmp_path, monkeypatch)
