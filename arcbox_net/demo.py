"""The README's demo: a namespace guest leases an address and pings its gateway.

Run as root (``scripts/demo.sh``). It creates a network namespace, serves it
with ``twistd -n arcbox-net --netns``, runs busybox udhcpc and ping inside,
prints what happened and removes everything it made.
"""

import os
import select
import signal
import subprocess
import sys
import tempfile

SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip -4 addr add "$ip/${mask:-24}" dev "$interface"
    ip -4 route replace default via "$router" dev "$interface"
    echo "lease: $ip/$mask router $router dns $dns mtu ${mtu:-?} lease ${lease}s" ;;
esac
"""


def sh(*cmd, check=True):
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    out = (result.stdout + result.stderr).strip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if check and result.returncode:
        raise SystemExit(f"demo: {' '.join(cmd)} failed")
    return result


def main():
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it creates a network namespace)")
    ns = f"arcbox-demo-{os.getpid()}"
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    stack = None
    ok = False
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "udhcpc.sh")
        with open(script, "w") as f:
            f.write(SCRIPT)
        os.chmod(script, 0o755)
        sh("ip", "netns", "add", ns)
        try:
            ready_r, ready_w = os.pipe()
            print(f"+ twistd -n arcbox-net --netns {ns}", flush=True)
            stack = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "arcbox-net", "--netns", ns,
                 "--ready-fd", str(ready_w)],
                pass_fds=(ready_w,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            os.close(ready_w)
            if not select.select([ready_r], [], [], 15)[0] or os.read(ready_r, 1) != b"1":
                raise SystemExit("demo: the stack did not start")
            os.close(ready_r)
            sh("ip", "netns", "exec", ns, "busybox", "udhcpc", "-i", "tap0", "-f", "-q", "-n",
               "-t", "5", "-T", "1", "-s", script)
            sh("ip", "-n", ns, "-4", "addr", "show", "dev", "tap0")
            sh("ip", "-n", ns, "route")
            ping = sh("ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.3", "10.0.2.1",
                      check=False)
            ok = ping.returncode == 0
            print(f"\ndemo: guest in {ns} leased its address and "
                  f"{'pinged' if ok else 'could NOT ping'} the gateway 10.0.2.1", flush=True)
        finally:
            if stack is not None and stack.poll() is None:
                stack.send_signal(signal.SIGTERM)
                try:
                    out, _ = stack.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    stack.kill()
                    out, _ = stack.communicate()
                print("\nstack log:\n  " + out.strip().replace("\n", "\n  "))
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            print(f"demo: removed namespace {ns}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
