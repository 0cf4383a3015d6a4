"""Real Linux VM guests for the tests: a Debian cloud kernel and a busybox initramfs under QEMU.

The image is built on the host from Debian packages, never installed: the
package ``linux-image-cloud-amd64`` depends on and ``busybox-static`` are
fetched with ``apt-get download`` and unpacked with ``dpkg -x``. The kernel's
bzImage carries an LZ4 payload; the uncompressed ELF inside it boots directly
with ``-kernel`` (so no bootloader and no decompression under TCG). The
initramfs holds busybox, the virtio-net modules and ``tests/programs/vm-init.sh``
as /init; each VM appends a second cpio archive with its own /test.sh (the
kernel unpacks concatenated archives in order). Everything is cached outside
the git tree, keyed by kernel version and the inputs of the initramfs, so
re-runs neither download nor rebuild.

``/dev/kvm`` on these machines is nested and a stock kernel dies in it, so VMs
run under TCG unless ARCBOX_VM_KVM=1.
"""

import contextlib
import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import attrs

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = os.path.join(HERE, "programs")
INIT_SCRIPT = os.path.join(PROGRAMS, "vm-init.sh")
UDHCPC_SCRIPT = os.path.join(PROGRAMS, "udhcpc-script.sh")
CACHE = os.environ.get("ARCBOX_VM_CACHE", "/var/cache/arcbox-net-tests")
KERNEL_META = "linux-image-cloud-amd64"
QEMU = "qemu-system-x86_64"
#: virtio_net and what it needs, in load order (all modules in the cloud kernel).
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "failover", "net_failover", "virtio_net")
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
#: Host tools the image build and the VMs need (scripts/setup.sh installs them).
TOOLS = ("apt-get", "apt-cache", "dpkg", "lz4", QEMU)


class ImageError(Exception):
    """The guest image could not be built (a missing tool or package)."""


@attrs.frozen
class GuestImage:
    kernel_version: str
    vmlinux: str
    initramfs: str


def missing_tools():
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    if result.returncode != 0:
        raise ImageError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                         f"{result.stdout}{result.stderr}")
    return result.stdout


def _apt_updated():
    _run(["apt-get", "update", "-qq"])


def kernel_package():
    """The versioned kernel package the cloud metapackage depends on."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True,
                             text=True, timeout=60).stdout
        found = re.findall(r"Depends:\s*(linux-image-\S+)", out)
        if found:
            return found[0]
        if attempt == 0:  # a fresh machine: no package lists yet
            _apt_updated()
    raise ImageError(f"apt-cache knows no package {KERNEL_META} depends on:\n{out}")


class DownloadError(ImageError):
    """apt-get download failed (stale package lists, or no mirror)."""


def _download(package, directory):
    """``apt-get download`` into ``directory``: the .deb's path."""
    result = subprocess.run(["apt-get", "download", "-q", package], cwd=directory,
                            capture_output=True, text=True, timeout=600)
    debs = [f for f in os.listdir(directory)
            if f.startswith(package + "_") and f.endswith(".deb")]
    if result.returncode != 0 or not debs:
        raise DownloadError(f"apt-get download {package} failed:\n"
                            f"{result.stdout}{result.stderr}")
    return os.path.join(directory, debs[0])


def extract_vmlinux(bzimage, out):
    """Write the uncompressed ELF kernel inside an LZ4-compressed bzImage to ``out``."""
    with open(bzimage, "rb") as f:
        data = f.read()
    start = data.find(LZ4_LEGACY_MAGIC)
    if start < 0:
        raise ImageError(f"{bzimage}: no LZ4 payload")
    # lz4 stops at the end of its frame and ignores the bzImage's trailer.
    result = subprocess.run(["lz4", "-dc"], input=data[start:], capture_output=True,
                            timeout=120)
    if not result.stdout.startswith(b"\x7fELF"):
        raise ImageError(f"{bzimage}: the LZ4 payload is not an ELF kernel: "
                         f"{result.stderr.decode(errors='replace')}")
    with open(out, "wb") as f:
        f.write(result.stdout)


def cpio_newc(files):
    """An uncompressed newc cpio archive of ``{path: (mode, bytes)}`` (directories: bytes None).

    Written here rather than with a cpio tool, so building a VM's archive needs
    nothing on the host. Missing parent directories are added: the kernel
    creates no directory a file's path implies.
    """
    files = dict(files)
    for name in list(files):
        parent = os.path.dirname(name)
        while parent and parent not in files:
            files[parent] = (0o755, None)
            parent = os.path.dirname(parent)
    out = io.BytesIO()

    def entry(name, mode, data, ino):
        name_b = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        out.write(header.encode() + name_b)
        out.write(b"\0" * (-(110 + len(name_b)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, (name, (mode, data)) in enumerate(sorted(files.items()), start=1):
        if data is None:
            entry(name, 0o040000 | mode, b"", ino)
        else:
            entry(name, 0o100000 | mode, data, ino)
    entry("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def host_program(name):
    """``{path: (mode, bytes)}`` for a host program and the libraries ``ldd`` lists.

    Each lands at the path the dynamic loader will look for it, so e.g. the
    host's iperf3 runs in the guest as it is.
    """
    path = shutil.which(name)
    if path is None:
        raise ImageError(f"{name} is not installed on the host")
    files = {f"bin/{name}": (0o755, _read(path))}
    out = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        found = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if found:
            lib = found.group(1)
            files[lib.lstrip("/")] = (0o755, _read(os.path.realpath(lib)))
    return files


def _initramfs_files(busybox, modules_dir):
    files = {
        "bin": (0o755, None), "lib": (0o755, None), "lib/modules": (0o755, None),
        "proc": (0o755, None), "sys": (0o755, None), "dev": (0o755, None),
        "tmp": (0o1777, None), "www": (0o755, None), "etc": (0o755, None),
        "bin/busybox": (0o755, _read(busybox)),
        "bin/udhcpc-script": (0o755, _read(UDHCPC_SCRIPT)),
        "init": (0o755, _read(INIT_SCRIPT)),
        "lib/modules/order": (0o644, ("\n".join(MODULES) + "\n").encode()),
    }
    for name in MODULES:
        files[f"lib/modules/{name}.ko"] = (0o644, _read(os.path.join(modules_dir, name + ".ko")))
    return files


def _find_modules(root):
    """The directory per module name of every module in MODULES under ``root``."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            if n.endswith(".ko") and n[:-3] in MODULES:
                found[n[:-3]] = os.path.join(dirpath, n)
    missing = set(MODULES) - set(found)
    if missing:
        raise ImageError(f"kernel package lacks modules {sorted(missing)}")
    return found


@contextlib.contextmanager
def _locked(cache):
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fetch_kernel(package, kdir, cache):
    """Download and unpack ``package``; keep vmlinux and the needed modules in ``kdir``."""
    with tempfile.TemporaryDirectory(dir=cache) as work:
        deb = _download(package, work)
        root = os.path.join(work, "root")
        _run(["dpkg", "-x", deb, root])
        version = package.removeprefix("linux-image-")
        staging = os.path.join(work, "kernel")
        os.makedirs(os.path.join(staging, "modules"))
        extract_vmlinux(os.path.join(root, "boot", f"vmlinuz-{version}"),
                        os.path.join(staging, "vmlinux"))
        for name, path in _find_modules(os.path.join(root, "lib", "modules")).items():
            shutil.copy(path, os.path.join(staging, "modules", name + ".ko"))
        os.rename(staging, kdir)


def _fetch_busybox(bdir, cache):
    with tempfile.TemporaryDirectory(dir=cache) as work:
        deb = _download("busybox-static", work)
        root = os.path.join(work, "root")
        _run(["dpkg", "-x", deb, root])
        staging = os.path.join(work, "bb")
        os.makedirs(staging)
        shutil.copy(os.path.join(root, "bin", "busybox"), os.path.join(staging, "busybox"))
        with open(os.path.join(staging, "deb"), "w") as f:
            f.write(os.path.basename(deb) + "\n")
        os.rename(staging, bdir)


def build_image(cache=CACHE):
    """The cached guest image for the current cloud kernel, built first if need be."""
    missing = missing_tools()
    if missing:
        raise ImageError(f"missing host tools: {', '.join(missing)} (run scripts/setup.sh)")
    try:
        return _build_image(cache)
    except DownloadError:
        # Package lists older than the mirror name a kernel it no longer has.
        _apt_updated()
        return _build_image(cache)


def _build_image(cache):
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    with _locked(cache):
        kdir = os.path.join(cache, version)
        if not os.path.exists(os.path.join(kdir, "vmlinux")):
            _fetch_kernel(package, kdir, cache)
        bdir = os.path.join(cache, "busybox-static")
        if not os.path.exists(os.path.join(bdir, "busybox")):
            _fetch_busybox(bdir, cache)
        files = _initramfs_files(os.path.join(bdir, "busybox"), os.path.join(kdir, "modules"))
        digest = hashlib.sha256()
        for name, (mode, data) in sorted(files.items()):
            digest.update(f"{name}:{mode}:".encode() + (data or b"") + b"\0")
        initramfs = os.path.join(kdir, f"initramfs-{digest.hexdigest()[:16]}.cpio.gz")
        if not os.path.exists(initramfs):
            tmp = initramfs + ".tmp"
            with open(tmp, "wb") as f:
                f.write(gzip.compress(cpio_newc(files), compresslevel=6))
            os.rename(tmp, initramfs)
        _prune(cache, kdir, initramfs)
    return GuestImage(version, os.path.join(kdir, "vmlinux"), initramfs)


def _prune(cache, kdir, initramfs):
    """Remove what older kernels and older initramfs inputs left in the cache."""
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if name[:1].isdigit() and os.path.isdir(path) and path != kdir:
            shutil.rmtree(path, ignore_errors=True)
    # Another checkout's run may use its own initramfs right now: only old ones go.
    for name in os.listdir(kdir):
        path = os.path.join(kdir, name)
        if (name.startswith("initramfs-") and path != initramfs
                and time.time() - os.stat(path).st_mtime > 24 * 3600):
            os.unlink(path)


def stream_client(path, id="n0"):
    """QEMU connects to arcbox-net's --listen-stream PATH."""
    return f"stream,id={id},server=off,addr.type=unix,addr.path={path}"


def stream_server(path, id="n0"):
    """QEMU listens on PATH for arcbox-net's --connect-stream."""
    return f"stream,id={id},server=on,addr.type=unix,addr.path={path}"


def dgram_unix(local, remote, id="n0"):
    """QEMU binds ``local`` and sends to arcbox-net's --listen-dgram ``remote``."""
    return (f"dgram,id={id},local.type=unix,local.path={local},"
            f"remote.type=unix,remote.path={remote}")


def dgram_fd(fd, id="n0"):
    """QEMU uses an inherited connected datagram socket (a socketpair end)."""
    return f"dgram,id={id},local.type=fd,local.str={fd}"


def parse_results(lines):
    """``RESULT name=value`` lines as a dict (a repeated name keeps its last value)."""
    results = {}
    for line in lines:
        if line.startswith("RESULT "):
            name, _, value = line[len("RESULT "):].partition("=")
            results[name.strip()] = value.strip()
    return results


class VirtualMachine:
    """One QEMU guest: the cached image plus a per-VM /test.sh, serial console on a pipe.

    ``files`` (``{path: data}``) and ``programs`` (host programs such as
    ``"iperf3"``, with their libraries) go into the VM's own archive.

    Every console line is kept (and written to ``log_path``); ``on_line`` is
    called with each one from the reader thread, so a test can sample the
    stack's CPU the moment the guest prints a MARK. ``kill()`` (always call it,
    e.g. from a fixture's teardown) ends QEMU whatever state it is in.
    """

    def __init__(self, image, netdev, workdir, script, files=None, programs=(),
                 mac="52:54:00:12:34:56", memory=256, pass_fds=(), on_line=None, name="vm"):
        self.image = image
        self.netdev = netdev
        self.workdir = str(workdir)
        self.script = script
        self.files = dict(files or {})
        self.programs = tuple(programs)
        self.mac = mac
        self.memory = memory
        self.pass_fds = tuple(pass_fds)
        self.on_line = on_line
        self.name = name
        self.log_path = os.path.join(self.workdir, f"{name}-console.log")
        self.lines = []
        self.proc = None
        self._changed = threading.Condition()
        self._reader = None

    def _initrd(self):
        extra = {"test.sh": (0o755, self.script.encode())}
        for program in self.programs:
            extra.update(host_program(program))
        for path, data in self.files.items():
            extra[path.lstrip("/")] = (0o644, data if isinstance(data, bytes) else data.encode())
        path = os.path.join(self.workdir, f"{self.name}-initrd")
        with open(path, "wb") as out, open(self.image.initramfs, "rb") as base:
            shutil.copyfileobj(base, out)
            # The kernel looks for the next archive only at a 4-byte boundary
            # and skips zeros to reach it.
            out.write(b"\0" * (-out.tell() % 4))
            out.write(cpio_newc(extra))
        return path

    def command(self):
        if os.environ.get("ARCBOX_VM_KVM") == "1":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel = ["-accel", "tcg,thread=single", "-cpu", "max"]
        return [QEMU, "-nodefaults", "-display", "none", "-no-reboot", *accel,
                "-m", str(self.memory), "-serial", "stdio",
                "-kernel", self.image.vmlinux, "-initrd", self._initrd(),
                "-append", "console=ttyS0 quiet loglevel=1 panic=-1",
                "-netdev", self.netdev,
                "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}"]

    def start(self):
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     pass_fds=self.pass_fds, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self):
        with open(self.log_path, "w") as log:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                if self.on_line is not None:
                    try:
                        self.on_line(line)
                    except Exception as e:  # keep reading the console whatever it does
                        log.write(f"(on_line failed: {e!r})\n")
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def console(self):
        return "\n".join(self.lines)

    def wait_for(self, text, timeout=60):
        """Wait until a console line contains ``text``; the line."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                if not self._reader.is_alive():
                    raise AssertionError(f"{self.name} ended before {text!r}:\n{self.console()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {text!r} in {timeout} s:\n"
                                         f"{self.console()}")
                self._changed.wait(min(left, 1.0))

    def results(self):
        return parse_results(self.lines)

    def wait_exit(self, timeout=60):
        """Wait for QEMU to end (the guest powers off); its exit status."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not power off in {timeout} s:\n"
                                 f"{self.console()}") from None
        self._reader.join(10)
        return code

    def kill(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        self.proc.stdout.close()


if __name__ == "__main__":  # build (or show) the cached image: python tests/vmguest.py
    print(build_image())
