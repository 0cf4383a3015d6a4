"""Benchmark driver: every workload against every stack, alternating, in rounds.

    python -m bench.driver [--smoke] [--stacks arcbox-net,slirp4netns] [--out DIR] ...

(./bench/run.sh installs what this needs, then runs it.) Each round walks
the MTUs, and for each MTU every stack in turn (the order rotates per round);
each stack gets a fresh guest namespace, runs all workloads, and is torn
down. The report gives the median of the rounds. Needs root.
"""

import argparse
import datetime
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import time

from . import common, report
from .common import NETPROG, PYTHON, REPO, Unsupported, free_port, run, spawn, stop
from .iperf import IperfServer
from .stacks import STACKS
from .workloads import all_workloads


class Context:
    """What a workload gets: the running stack and the run's settings."""

    def __init__(self, stack, mtu, opts, echo_port, iperf):
        self.stack = stack
        self.mtu = mtu
        self.duration = opts.duration
        self.udp_rate = opts.udp_rate
        self.echo_port = echo_port
        self.iperf = iperf


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="quick check: 1 round, 1 s each, MTU 1500, small N, no micro-benchmarks")
    p.add_argument("--stacks", default=",".join(STACKS),
                   help=f"comma-separated, from {', '.join(STACKS)} (default: all)")
    p.add_argument("--rounds", type=int, help="rounds (default 3; smoke 1)")
    p.add_argument("--duration", type=float, help="seconds per timed run (default 2; smoke 1)")
    p.add_argument("--mtus", help="comma-separated MTUs (default 1500,65520; smoke 1500)")
    p.add_argument("--scale", help="comma-separated connection counts (default 1000,5000; "
                                   "smoke 50,200)")
    p.add_argument("--udp-rate", default="200M", help="iperf3 UDP offered rate (default 200M)")
    p.add_argument("--out", help="output folder (default bench/results; smoke bench/results/smoke)")
    p.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    p.add_argument("--workloads", help="comma-separated workload ids or prefixes to run "
                                       "(default: all; e.g. tcp_rr,conn_rate)")
    opts = p.parse_args(argv)
    smoke = opts.smoke
    opts.rounds = opts.rounds or (1 if smoke else 3)
    opts.duration = opts.duration or (1 if smoke else 2)
    opts.mtus = [int(m) for m in (opts.mtus or ("1500" if smoke else "1500,65520")).split(",")]
    opts.scale = [int(n) for n in (opts.scale or ("50,200" if smoke else "1000,5000")).split(",")]
    opts.stacks = [s.strip() for s in opts.stacks.split(",") if s.strip()]
    unknown = [s for s in opts.stacks if s not in STACKS]
    if unknown:
        p.error(f"unknown stack(s) {', '.join(unknown)}; choose from {', '.join(STACKS)}")
    results = os.path.join(REPO, "bench", "results")
    opts.out = opts.out or (os.path.join(results, "smoke") if smoke else results)
    opts.micro = not (smoke or opts.no_micro)
    return opts


def say(text):
    print(text, file=sys.stderr, flush=True)


def start_echo_server(stack):
    """bench/netprog.py's TCP+UDP echo server on the host side; (process, port)."""
    proc = spawn([PYTHON, NETPROG, "server", stack.server_addr, "0"], ns=stack.host_ns,
                 stdout=subprocess.PIPE, text=True)
    readable, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if readable else ""
    if not line.strip().isdigit():
        stop(proc)
        raise RuntimeError("the echo server did not start")
    return proc, int(line)


def run_stack(name, mtu, round_no, opts, workloads, logdir, twistd):
    """Start one stack for one MTU, run every workload, stop it; the records."""
    stack = STACKS[name](mtu, logdir, twistd)
    records = []
    only = stack.only_workloads
    todo = [(wid, fn) for wid, fn, every_mtu in workloads
            if (every_mtu or mtu == opts.mtus[0]) and (only is None or wid in only)]
    tag = f"[round {round_no + 1} mtu {mtu} {name}]"

    def record(wid, metrics=None, error=None, unsupported=False, seconds=None):
        records.append({"round": round_no, "mtu": mtu, "stack": name, "workload": wid,
                        "metrics": metrics, "error": error, "unsupported": unsupported})
        if metrics is not None:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                             if isinstance(v, (int, float)))
            say(f"{tag} {wid}: {shown} ({seconds:.1f} s)")
        else:
            say(f"{tag} {wid}: n/a: {error}")

    echo = iperf = None
    try:
        try:
            stack.start()
            echo, echo_port = start_echo_server(stack)
            iperf_port = 5201 if stack.host_ns else free_port()
            iperf = IperfServer(stack.host_ns, stack.server_addr, iperf_port).start()
            probe = run([PYTHON, NETPROG, "probe", stack.gateway, str(echo_port), "15"],
                        ns=stack.guest_ns, timeout=30)
            if probe.returncode != 0:
                raise RuntimeError("the guest cannot reach the host through it: "
                                   + common.last_line(probe.stderr))
        except Exception as e:
            unsupported = isinstance(e, Unsupported)
            reason = str(e) if unsupported else f"{name} did not start: {e}"
            for wid, _fn in todo:
                record(wid, error=reason, unsupported=unsupported)
            return records
        ctx = Context(stack, mtu, opts, echo_port, iperf)
        for wid, fn in todo:
            t0 = time.monotonic()
            try:
                with stack.competitor():
                    metrics = fn(ctx)
                record(wid, metrics, seconds=time.monotonic() - t0)
            except Unsupported as e:
                record(wid, error=str(e), unsupported=True)
            except Exception as e:
                record(wid, error=f"{type(e).__name__}: {e}")
        return records
    finally:
        if iperf is not None:
            iperf.stop()
        stop(echo)
        stack.stop()


def aggregate(records, stacks, mtus):
    """Median over rounds for each (workload, mtu, stack); reasons where it failed."""
    groups = {}
    for r in records:
        groups.setdefault((r["workload"], r["mtu"], r["stack"]), []).append(r)
    summary = []
    for (wid, mtu, stack), rs in groups.items():
        ok = [r["metrics"] for r in rs if r["metrics"] is not None]
        metrics, ranges = {}, {}
        for key in (ok[0] if ok else {}):
            values = [m[key] for m in ok if m.get(key) is not None]
            if values and isinstance(values[0], list):
                metrics[key] = [statistics.median(col) for col in zip(*values)]
            elif values:
                metrics[key] = statistics.median(values)
                ranges[key] = [min(values), max(values)]
            else:
                metrics[key] = None
        errors = list(dict.fromkeys(r["error"] for r in rs if r["error"]))
        summary.append({"workload": wid, "mtu": mtu, "stack": stack, "metrics": metrics,
                        "ranges": ranges,
                        "rounds": len(rs), "rounds_ok": len(ok), "errors": errors,
                        "unsupported": bool(rs) and all(r["unsupported"] for r in rs)})
    order = {s: i for i, s in enumerate(stacks)}
    summary.sort(key=lambda e: (e["workload"], e["mtu"], order.get(e["stack"], 99)))
    return summary


def tool_versions(stacks):
    versions = {"python": platform.python_version()}
    out = subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout
    versions["iperf3"] = out.split()[1] if out else None
    for name in stacks:
        try:
            versions[name] = STACKS[name].version()
        except Exception:
            versions[name] = None
    return versions


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = dirty = ""
    if shutil.which("git"):
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "load": f"{os.getloadavg()[0]:.2f}",
            "commit": commit + ("+local changes" if dirty else "")}


def run_micro(out_dir):
    """pytest-benchmark over bench/micro; the JSON's benchmarks, or an error string."""
    path = os.path.join(out_dir, "micro.json")
    result = run([PYTHON, "-m", "pytest", os.path.join(REPO, "bench", "micro"), "-q",
                  "-p", "no:cacheprovider", f"--benchmark-json={path}"], timeout=600)
    if result.returncode != 0 or not os.path.exists(path):
        return f"micro-benchmarks failed: {common.last_line(result.stdout + result.stderr)}"
    with open(path) as f:
        data = json.load(f)
    os.unlink(path)
    return [{"name": b["name"], "median_us": b["stats"]["median"] * 1e6,
             "ops_per_s": b["stats"]["ops"]} for b in data["benchmarks"]]


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (network namespaces, TAP devices)")
    twistd = os.path.join(os.path.dirname(PYTHON), "twistd")
    if "arcbox-net" in opts.stacks and not os.path.exists(twistd):
        raise SystemExit(f"bench: {twistd} not found: run ./scripts/setup.sh (or ./bench/run.sh)")
    os.makedirs(opts.out, exist_ok=True)
    logdir = os.path.join(opts.out, "logs")
    shutil.rmtree(logdir, ignore_errors=True)
    os.makedirs(logdir)
    common.install_signal_handlers()
    workloads = all_workloads(opts.scale)
    if opts.workloads:
        wanted = [w.strip() for w in opts.workloads.split(",") if w.strip()]
        workloads = [w for w in workloads if any(w[0].startswith(x) for x in wanted)]
        if not workloads:
            raise SystemExit(f"bench: no workload matches {opts.workloads}")
    started = time.monotonic()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "smoke" if opts.smoke else "full", "rounds": opts.rounds,
            "duration_s": opts.duration, "mtus": opts.mtus, "stacks": opts.stacks,
            "scale": opts.scale, "udp_rate": opts.udp_rate, "machine": machine(),
            "versions": tool_versions(opts.stacks)}
    records = []
    try:
        for round_no in range(opts.rounds):
            shift = round_no % len(opts.stacks)          # alternate who goes first
            order = opts.stacks[shift:] + opts.stacks[:shift]
            for mtu in opts.mtus:
                for name in order:
                    records += run_stack(name, mtu, round_no, opts, workloads, logdir, twistd)
        if opts.micro:
            say("micro-benchmarks (pytest-benchmark, bench/micro)")
            meta["micro"] = run_micro(opts.out)
    finally:
        common.cleanup()
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["machine"]["load"] += f" → {os.getloadavg()[0]:.2f}"
    summary = aggregate(records, opts.stacks, opts.mtus)
    result = {"meta": meta, "summary": summary, "records": records}
    with open(os.path.join(opts.out, "latest.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    report.write(opts.out, result)
    say(f"bench: done in {meta['elapsed_s']:.0f} s; wrote {opts.out}/latest.md, latest.json, "
        f"throughput.png, latency.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("bench: interrupted; everything it started has been stopped")
        sys.exit(130)
