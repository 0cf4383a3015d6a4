"""Scale: N concurrent idle connections from the guest, then every one echoes
1 KB. Reports the echo time, how many succeeded, and the stack's RSS and open
fds while the N connections are held."""

import json
import select
import subprocess
import time

from ..common import PYTHON, NETPROG, open_fds, rss_mib, spawn, stop


def read_json_line(proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.5)
        if readable:
            line = proc.stdout.readline()
            if not line:
                break
            return json.loads(line)
        if proc.poll() is not None:
            break
    raise RuntimeError(f"scale client gave no result within {timeout} s")


def idle_then_echo(ctx, n):
    stack = ctx.stack
    client = spawn([PYTHON, NETPROG, "scale", stack.gateway, str(ctx.echo_port), str(n)],
                   ns=stack.guest_ns, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                   stderr=subprocess.DEVNULL, text=True)
    try:
        opened = read_json_line(client, timeout=120)
        time.sleep(0.5)                       # let the stack settle with N idle connections
        rss = fds = None
        if stack.pid is not None:
            rss, fds = rss_mib(stack.pid), open_fds(stack.pid)
        client.stdin.write("go\n")
        client.stdin.flush()
        done = read_json_line(client, timeout=120)
    finally:
        stop(client)
    if done["ok"] == 0:
        raise RuntimeError(f"no connection echoed ({opened['open']} of {n} opened; "
                           f"{', '.join(done['errors'])})")
    return {"open_s": done["open_seconds"], "echo_s": done["echo_seconds"], "ok": done["ok"],
            "rss_mib": rss, "fds": fds}


def workloads(sizes):
    """One workload per N; the sizes come from the run's options."""
    return [(f"scale_{n}", lambda ctx, n=n: idle_then_echo(ctx, n), False) for n in sizes]
