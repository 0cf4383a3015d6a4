"""Soak: the stack under every kind of traffic at once for minutes; does anything grow?

    .venv/bin/python -m bench.soak --minutes 10 --out bench/results/soak

(root; not part of CI, where tests/guest/test_soak.py runs it for 15 s.)

The stack runs as users run it, ``twistd -n arcbox-net --netns NS`` with
``--deny 0.0.0.0/0 --allow 127.0.0.0/8``, the control API, a ``--map``, port
forwards, a short DHCP lease and an upstream DNS server of our own on
127.0.0.1 (the host's resolv.conf is never used). The guest configures
itself with a long-running busybox udhcpc, which renews every lease/2
seconds. Then, all at once until the time is up (bench/soakload.py):

  from the guest   iperf3 bursts to the host both ways; short TCP connections
                   and new UDP flows to echo servers behind the gateway and
                   the mapped address; DNS over UDP and TCP (local names,
                   upstream answers, NXDOMAIN, a silent upstream, over-long
                   labels and names) and junk on port 53; pings to the gateway
                   and the mapped address; garbage frames on the TAP (runts,
                   bad checksums, unknown ethertypes and protocols, fragments,
                   spoofed sources, strangers' MACs, DHCP DISCOVERs from new MACs)
  from the host    iperf3 bursts through a forward both ways; short TCP
                   connections and UDP flows through forwards; the API read
                   (/stats, /metrics, /connections, ...), forwards added and
                   removed, bad requests, a short capture every 30 s

Every ``--interval`` seconds it samples the stack's RSS (VmRSS), open fds,
CPU seconds, threads, log size and, from /stats and /metrics, frames and
flows per protocol. After the traffic stops it waits for the flows to drain.

Verdict (written to summary.json/summary.md, exit 1 when it fails):
  rss     after the warm-up (the first ``--warmup`` fraction of the traffic
          time), the second half's highest RSS is within ``--rss-tolerance``
          (10 %) of the first half's highest
  fds     once the traffic has stopped and every flow has drained, the open
          fds are back to the baseline taken before the traffic started
          (within ``--fd-slack``, 0 by default)
  flows   TCP, UDP and ICMP flows all back to 0 (UDP flows that saw replies
          idle out after the stack's 180 s established timeout, so the
          drain waits up to ``--drain`` 200 s)
  held    at the end, fds above the baseline are no more than the live
          flows (each holds one host socket): this holds after a short
          drain too, which is all the 15-second smoke test can wait for
  alive   the stack still runs, and every kind of traffic that must succeed
          succeeded in the second half too
Results: samples.csv, soak.png (RSS, fds and flows over time), summary.json,
summary.md.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from . import common
from .common import PYTHON, REPO, free_port, netns_add, spawn, stop, wait_ready_fd

SOAKLOAD = os.path.join(REPO, "bench", "soakload.py")
NETPROG = os.path.join(REPO, "bench", "netprog.py")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
GATEWAY = "10.0.2.1"
GATEWAY_MAC = "02:ab:cb:00:00:01"
MAPPED = "203.0.113.10"
MAPPED_HOST = "127.0.0.2"
GUEST_ECHO_PORT = 7000
GUEST_IPERF_PORT = 5201
ZONE = "soak.test"
#: Kinds whose every request has a right answer: each must keep succeeding.
#: (Garbage frames and port-53 junk are only sent.)
MUST_SUCCEED = ("guest_bulk", "guest_short_tcp", "guest_udp_flows", "dns_udp", "dns_tcp",
                "ping_gateway", "ping_mapped", "forward_bulk", "forward_short_tcp",
                "forward_udp_flows", "api", "api_capture")
UDHCPC_SCRIPT = """#!/bin/sh
# Apply a lease only when it differs from what the interface has, so a renewal
# never takes the address away from the traffic; record every event.
echo "$1 ${ip:-}" >> "$RECORD"
case "$1" in
  deconfig) ip link set "$interface" up ;;
  bound|renew)
    if ! ip -4 addr show dev "$interface" | grep -q "inet $ip/"; then
      ip -4 addr flush dev "$interface"
      ip -4 addr add "$ip/${mask:-24}" dev "$interface"
    fi
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do ip -4 route replace default via "$r" dev "$interface"; break; done ;;
esac
exit 0
"""
FIELDS = ["t", "phase", "rss_mib", "fds", "cpu_s", "cpu_pct", "threads", "log_kib", "tcp_flows",
          "udp_flows", "icmp_flows", "leases", "frames_in", "frames_out", "drops"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="traffic time in minutes (default 10)")
    length.add_argument("--seconds", type=float, help="traffic time in seconds")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "soak"),
                   help="results folder (default bench/results/soak)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples (2)")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="fraction of the traffic time left out of the RSS verdict (0.2)")
    p.add_argument("--rss-tolerance", type=float, default=0.10,
                   help="allowed rise of the second half's RSS peak over the first's (0.10)")
    p.add_argument("--fd-slack", type=int, default=0,
                   help="fds above the baseline still counted as back (0)")
    p.add_argument("--drain", type=float, default=200.0,
                   help="seconds to wait for flows and fds to drain after the traffic (200: "
                        "past the 180 s idle timeout of UDP flows that saw replies)")
    p.add_argument("--rate", default="200M", help="iperf3 rate of each bulk burst (200M)")
    p.add_argument("--burst", type=int, default=3, help="seconds of each iperf3 burst (3)")
    p.add_argument("--burst-gap", type=float, default=3.0, help="seconds between bursts (3)")
    p.add_argument("--lease-time", type=int, default=20,
                   help="DHCP lease (udhcpc renews at half of it; default 20)")
    p.add_argument("--udp-timeout", type=float, default=15.0,
                   help="the stack's UDP flow idle timeout (15)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--keep-logs", action="store_true",
                   help="copy the stack's and the load's logs into the results folder")
    opts = p.parse_args(argv)
    opts.duration = (opts.seconds if opts.seconds is not None
                     else 60 * (opts.minutes if opts.minutes is not None else 10))
    return opts


def api_get(path, url, timeout=5):
    """GET ``url`` from the API on unix socket ``path``; the body (bytes) or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(f"GET {url} HTTP/1.0\r\nHost: arcbox\r\n\r\n".encode())
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0] else None


def metrics(text):
    """Prometheus text -> {"name{labels}": value}."""
    values = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return values


def proc_threads(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


class Sampler(threading.Thread):
    """Samples the stack every ``interval`` s into ``rows`` (and the CSV as it goes)."""

    def __init__(self, pid, api, log_path, interval, csv_path):
        super().__init__(name="sampler", daemon=True)
        self.pid, self.api, self.log_path, self.interval = pid, api, log_path, interval
        self.rows = []
        self.phase = "baseline"
        self.t0 = time.monotonic()
        self.halt = threading.Event()
        self._last_cpu = None
        self._csv = open(csv_path, "w", newline="")
        self._writer = csv.DictWriter(self._csv, FIELDS)
        self._writer.writeheader()

    def sample(self):
        now = time.monotonic() - self.t0
        cpu = common.cpu_seconds(self.pid)
        cpu_pct = None
        if self._last_cpu is not None and cpu is not None and now > self._last_cpu[0]:
            cpu_pct = 100 * (cpu - self._last_cpu[1]) / (now - self._last_cpu[0])
        self._last_cpu = (now, cpu)
        row = {"t": round(now, 1), "phase": self.phase, "rss_mib": round(common.rss_mib(self.pid), 2),
               "fds": common.open_fds(self.pid), "cpu_s": cpu,
               "cpu_pct": None if cpu_pct is None else round(cpu_pct, 1),
               "threads": proc_threads(self.pid)}
        try:
            row["log_kib"] = round(os.path.getsize(self.log_path) / 1024, 1)
        except OSError:
            row["log_kib"] = None
        m = api_get(self.api, "/metrics")
        if m is not None:
            v = metrics(m)
            row.update(tcp_flows=v.get('arcbox_flows{protocol="tcp"}'),
                       udp_flows=v.get('arcbox_flows{protocol="udp"}'),
                       icmp_flows=v.get('arcbox_flows{protocol="icmp"}'),
                       leases=v.get("arcbox_leases"),
                       frames_in=v.get('arcbox_frames_total{direction="in"}'),
                       frames_out=v.get('arcbox_frames_total{direction="out"}'),
                       drops=sum(x for k, x in v.items() if k.startswith("arcbox_drops_total")))
        s = api_get(self.api, "/stats")
        if s is not None:                      # /stats must answer too, and be JSON
            json.loads(s)
        self.rows.append(row)
        self._writer.writerow(row)
        self._csv.flush()
        return row

    def run(self):
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def halt_and_join(self):
        self.halt.set()
        if self.is_alive():
            self.join(self.interval + 10)

    def close(self):
        self.halt_and_join()
        self._csv.close()


class Load:
    """A soakload.py side: started, read line by line, stopped with SIGTERM."""

    def __init__(self, mode, cfg, ns, log):
        self.proc = spawn([PYTHON, SOAKLOAD, mode, json.dumps(cfg)], ns=ns,
                          stdout=subprocess.PIPE, stderr=log, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"soakload {mode} did not start")
        self.reports = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.reports.append(json.loads(line))
            except ValueError:
                pass

    def finish(self):
        self.proc.terminate()
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.reader.join(5)
        stop(self.proc)
        return self.reports


def wait_for(predicate, timeout, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def ns_ipv4(ns, iface="tap0"):
    out = subprocess.run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", iface],
                         capture_output=True, text=True, check=False).stdout.split()
    return out[out.index("inet") + 1].split("/")[0] if "inet" in out else None


def log_tail(path):
    with open(path, errors="replace") as f:
        return common.last_line(f.read())


def start_stack(opts, ns, tmp, ports):
    api = os.path.join(tmp, "api.sock")
    log_path = os.path.join(tmp, "stack.log")
    args = ["--netns", ns, "--deny", "0.0.0.0/0", "--allow", "127.0.0.0/8",
            "--dns-upstream", f"127.0.0.1:{ports['dns']}", "--dns-timeout", "2",
            "--api", api, "--map", f"{MAPPED}={MAPPED_HOST}",
            "--forward", f"tcp:127.0.0.1:{ports['forward']}:{GUEST_ECHO_PORT}",
            "--forward", f"udp:127.0.0.1:{ports['forward']}:{GUEST_ECHO_PORT}",
            "--forward", f"tcp:127.0.0.1:{ports['forward_iperf']}:{GUEST_IPERF_PORT}",
            "--lease-time", str(opts.lease_time), "--udp-timeout", str(opts.udp_timeout)]
    read_fd, write_fd = os.pipe()
    cmd = [TWISTD, "-n", "--pidfile=", "arcbox-net", *args, "--ready-fd", str(write_fd)]
    with open(log_path, "w") as log:
        proc = spawn(cmd, log=log, pass_fds=(write_fd,))
    os.close(write_fd)
    if not wait_ready_fd(read_fd, proc, timeout=30):
        raise RuntimeError(f"arcbox-net did not become ready: {log_tail(log_path)}")
    return proc, api, log_path, cmd


def halves(rows, start, end):
    """The rows with start <= t < end, split in two halves by time."""
    mid = (start + end) / 2
    return ([r for r in rows if start <= r["t"] < mid], [r for r in rows if mid <= r["t"] <= end])


def verdict(opts, rows, t_traffic, t_stop, baseline_fds, end_row, reports, alive):
    checks = {}
    warm_end = t_traffic + opts.warmup * (t_stop - t_traffic)
    first, second = halves([r for r in rows if r["phase"] == "traffic"], warm_end, t_stop)
    if first and second:
        peak1 = max(r["rss_mib"] for r in first)
        peak2 = max(r["rss_mib"] for r in second)
        limit = peak1 * (1 + opts.rss_tolerance)
        post = first + second
        slope = _slope([(r["t"], r["rss_mib"]) for r in post]) * 60
        checks["rss"] = {
            "ok": peak2 <= limit, "first_half_peak_mib": peak1, "second_half_peak_mib": peak2,
            "limit_mib": round(limit, 2), "rise_percent": round(100 * (peak2 / peak1 - 1), 2),
            "slope_mib_per_min": round(slope, 3),
            "baseline_mib": rows[0]["rss_mib"] if rows else None,
            "peak_mib": max(r["rss_mib"] for r in rows), "end_mib": end_row["rss_mib"],
            "warmup_until_s": round(warm_end, 1)}
        fd1 = max(r["fds"] for r in first)
        fd2 = max(r["fds"] for r in second)
        checks["fds_during"] = {"first_half_peak": fd1, "second_half_peak": fd2}
    else:
        checks["rss"] = {"ok": False, "why": "too few samples after the warm-up"}
    checks["fds"] = {"ok": end_row["fds"] <= baseline_fds + opts.fd_slack,
                     "baseline": baseline_fds, "end": end_row["fds"], "slack": opts.fd_slack,
                     "peak": max(r["fds"] for r in rows)}
    flows = {p: end_row.get(f"{p}_flows") for p in ("tcp", "udp", "icmp")}
    checks["flows"] = {"ok": all(v == 0 for v in flows.values()), **flows}
    live = sum(int(v or 0) for v in flows.values())
    checks["held"] = {"ok": end_row["fds"] <= baseline_fds + opts.fd_slack + live,
                      "fds_over_baseline": end_row["fds"] - baseline_fds, "live_flows": live}
    stalled = []
    totals = {}
    for side, side_reports in reports.items():
        finals = [r for r in side_reports if r.get("final")] or side_reports[-1:]
        if not finals:
            stalled.append(f"{side}: no report")
            continue
        final = finals[-1]["kinds"]
        totals.update(final)
        # The report nearest the middle of the traffic, to see the second half on its own.
        mid_t = (t_stop - t_traffic) / 2
        mids = [r for r in side_reports if not r.get("final") and r["t"] <= mid_t]
        mid = mids[-1]["kinds"] if mids else {}
        for name, counts in final.items():
            if name.removesuffix("_2") in MUST_SUCCEED:
                earlier = mid.get(name, {}).get("ok", 0)
                if counts["ok"] == 0:
                    stalled.append(f"{name}: never succeeded")
                elif counts["ok"] == earlier and earlier >= 3:   # (rare kinds: too few to tell)
                    stalled.append(f"{name}: no success in the second half")
    missing = [k for k in MUST_SUCCEED if k not in totals]
    stalled += [f"{k}: never ran" for k in missing]
    checks["alive"] = {"ok": alive and not stalled, "stack_running": alive, "problems": stalled}
    ok = all(c["ok"] for c in checks.values() if "ok" in c)
    return ok, checks, totals


def _slope(points):
    """Least-squares slope of (x, y) points (0 with fewer than two)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def plot(rows, marks, path):
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    series = [("rss_mib", "RSS (MiB)", axes[0]), ("fds", "open fds", axes[1])]
    for key, label, ax in series:
        ax.plot(t, [r[key] for r in rows], lw=1.2)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    for key in ("tcp_flows", "udp_flows", "icmp_flows"):
        axes[2].plot(t, [r.get(key) or 0 for r in rows], lw=1, label=key.split("_")[0])
    axes[2].set_ylabel("flows")
    axes[2].legend(loc="upper right", fontsize=8)
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.axvspan(marks["traffic"], marks["warm_end"], color="0.9", lw=0)
        ax.axvline(marks["stop"], color="0.4", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].set_title("arcbox-net soak: mixed traffic from guest and host "
                      "(grey: warm-up; dashed: traffic stops)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def log_lines(path, top=12):
    """The stack's log lines by kind, most first: the source ``[namespace#level]`` and the
    message's first words with numbers, addresses and paths blanked, so one line a
    request (or a frame, or a flow) adds up to one big count."""
    counts = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 2)
                if len(parts) < 3 or not parts[1].startswith("["):
                    key = "(continuation line)"
                elif ' HTTP/1.' in parts[2]:
                    key = f"{parts[1]} (API request, twisted.web's access log)"
                else:
                    words = re.sub(r"0x[0-9a-f]+|[0-9a-f:]{11,}|[\d.:/]*\d[\d.:/]*|'[^']*'|\"[^\"]*\"",
                                   "N", parts[2]).split()[:6]
                    key = f"{parts[1]} {' '.join(words)}"
                counts[key] = counts.get(key, 0) + 1
    except OSError:
        pass
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return ranked[:top] + ([("(other kinds)", sum(n for _, n in ranked[top:]))]
                           if ranked[top:] else [])


def write_summary(out, summary):
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    c = summary["checks"]
    rss, fds, flows = c["rss"], c["fds"], c["flows"]
    lines = [f"# Soak, {summary['date']}", "",
             f"Verdict: **{'no growth' if summary['ok'] else 'FAILED'}** "
             f"({summary['traffic_seconds']:.0f} s of traffic, a sample every "
             f"{summary['interval']} s, warm-up {summary['warmup_fraction']:.0%}).", "",
             "| check | result | figures |", "|---|---|---|"]
    if "first_half_peak_mib" in rss:
        lines.append(f"| RSS | {'ok' if rss['ok'] else 'GREW'} | peak after warm-up "
                     f"{rss['first_half_peak_mib']} MiB (first half) vs "
                     f"{rss['second_half_peak_mib']} MiB (second half), "
                     f"{rss['rise_percent']:+} % (limit +{summary['rss_tolerance']:.0%}); "
                     f"slope {rss['slope_mib_per_min']:+} MiB/min; baseline "
                     f"{rss['baseline_mib']} MiB, end {rss['end_mib']} MiB |")
    else:
        lines.append(f"| RSS | FAILED | {rss.get('why')} |")
    lines.append(f"| fds | {'ok' if fds['ok'] else 'GREW'} | baseline {fds['baseline']}, "
                 f"peak {fds['peak']}, after drain {fds['end']} (slack {fds['slack']}; "
                 f"drained in {summary['drain_seconds']} s) |")
    lines.append(f"| flows | {'ok' if flows['ok'] else 'LEFT'} | after drain: tcp {flows['tcp']}, "
                 f"udp {flows['udp']}, icmp {flows['icmp']} |")
    held = c["held"]
    lines.append(f"| held | {'ok' if held['ok'] else 'LEAKED'} | fds over the baseline at the end: "
                 f"{held['fds_over_baseline']}, live flows {held['live_flows']} |")
    alive = c["alive"]
    lines.append(f"| alive | {'ok' if alive['ok'] else 'FAILED'} | stack running: "
                 f"{alive['stack_running']}; {'; '.join(alive['problems']) or 'every kind of traffic kept succeeding'} |")
    lines += ["", f"Stack CPU: {summary['cpu_seconds']} s; log {summary['log_kib']} KiB; "
              f"frames in/out {summary['frames_in']}/{summary['frames_out']}, drops "
              f"{summary['drops']}; DHCP events {summary['dhcp_events']}.", "",
              "| traffic | ok | failed | errors |", "|---|---:|---:|---|"]
    for name, k in sorted(summary["traffic"].items()):
        extra = {key: v for key, v in k.items() if key not in ("ok", "fail", "errors")}
        errs = ", ".join(f"{e} ×{n}" for e, n in sorted(k["errors"].items()))
        more = ", ".join(f"{key} {v / 1e6:.0f} MB" for key, v in sorted(extra.items()))
        lines.append(f"| {name} | {k['ok']} | {k['fail']} | {'; '.join(x for x in (errs, more) if x)} |")
    lines += ["", "Stack log lines by source (a flood would show here):", ""]
    lines += [f"- {n} × `{src}`" for src, n in summary["log_lines"]]
    lines += ["", f"Command: `{summary['command']}`", ""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)


def soak(opts):
    if os.geteuid() != 0:
        raise SystemExit("the soak needs root (network namespaces, a TAP)")
    for tool in ("ip", "busybox", "iperf3", "ping"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/setup.sh installs it)")
    os.makedirs(opts.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="arcbox-soak-")
    ports = {"echo": free_port(), "iperf": free_port(), "dns": free_port(),
             "forward": free_port(), "forward_iperf": free_port()}
    loads = {}
    sampler = None
    try:
        loadlog = open(os.path.join(tmp, "load.log"), "w")
        # Host-side servers: upstream DNS, echo behind the gateway and the mapped address, iperf3.
        dns = spawn([PYTHON, SOAKLOAD, "dns", str(ports["dns"])], stdout=subprocess.PIPE,
                    text=True)
        if dns.stdout.readline().strip() != "ready":
            raise RuntimeError("the upstream DNS server did not start")
        for host in ("127.0.0.1", MAPPED_HOST):
            echo = spawn([PYTHON, NETPROG, "server", host, str(ports["echo"])],
                         stdout=subprocess.PIPE, text=True)
            echo.stdout.readline()
        spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(ports["iperf"])])
        ns = netns_add(f"abxs-{os.getpid()}")
        stack, api, log_path, cmd = start_stack(opts, ns, tmp, ports)
        # The guest: a DHCP client that stays (renewals), its echo and iperf3 servers.
        script = os.path.join(tmp, "udhcpc.sh")
        with open(script, "w") as f:
            f.write(UDHCPC_SCRIPT)
        os.chmod(script, 0o755)
        dhcp_record = os.path.join(tmp, "dhcp.events")
        spawn(["env", f"RECORD={dhcp_record}", "busybox", "udhcpc", "-i", "tap0", "-f",
               "-t", "10", "-T", "1", "-s", script], ns=ns, log=loadlog)
        if not wait_for(lambda: ns_ipv4(ns) is not None, 20):
            raise RuntimeError("the guest got no lease")
        guest_ip = ns_ipv4(ns)
        echo = spawn([PYTHON, NETPROG, "server", "0.0.0.0", str(GUEST_ECHO_PORT)], ns=ns,
                     stdout=subprocess.PIPE, text=True)
        echo.stdout.readline()
        spawn(["iperf3", "-s", "-p", str(GUEST_IPERF_PORT)], ns=ns)
        time.sleep(1.0)

        sampler = Sampler(stack.pid, api, log_path, opts.interval,
                          os.path.join(opts.out, "samples.csv"))
        for _ in range(3):                     # the baseline: the idle stack, guest configured
            sampler.sample()
            time.sleep(opts.interval)
        baseline_fds = min(r["fds"] for r in sampler.rows)
        sampler.start()
        sampler.phase = "traffic"
        t_traffic = time.monotonic() - sampler.t0
        common_cfg = {"burst": opts.burst, "burst_gap": opts.burst_gap, "rate": opts.rate,
                      "report": 5, "soak": ns}      # the tag names this run's processes too
        loads["guest"] = Load("guest", {**common_cfg, "gateway": GATEWAY, "mapped": MAPPED,
                                        "echo_port": ports["echo"], "iperf_port": ports["iperf"],
                                        "zone": ZONE, "iface": "tap0", "guest_ip": guest_ip,
                                        "gateway_mac": GATEWAY_MAC}, ns, loadlog)
        loads["host"] = Load("host", {**common_cfg, "forward_port": ports["forward"],
                                      "forward_iperf_port": ports["forward_iperf"], "api": api,
                                      "guest_echo_port": GUEST_ECHO_PORT, "tmpdir": tmp},
                             None, loadlog)
        print(f"soak: {opts.duration:.0f} s of traffic, stack pid {stack.pid}, guest {guest_ip}",
              flush=True)
        deadline = time.monotonic() + opts.duration
        while time.monotonic() < deadline:
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
            if stack.poll() is not None:
                break
            if sampler.rows:
                r = sampler.rows[-1]
                print(f"  t={r['t']:6.0f}s rss={r['rss_mib']:.1f} MiB fds={r['fds']} "
                      f"cpu={r['cpu_pct']}% flows tcp/udp/icmp={r['tcp_flows']}/"
                      f"{r['udp_flows']}/{r['icmp_flows']}", flush=True)
        t_stop = time.monotonic() - sampler.t0
        reports = {side: load.finish() for side, load in loads.items()}
        sampler.phase = "drain"

        # Drain: UDP flows end after --udp-timeout, ICMP flows after theirs, TCP at close.
        def drained():
            row = sampler.rows[-1]
            return (row["fds"] <= baseline_fds + opts.fd_slack and row["tcp_flows"] == 0
                    and row["udp_flows"] == 0 and row["icmp_flows"] == 0)
        t_drain0 = time.monotonic()
        wait_for(lambda: sampler.rows[-1]["t"] > t_stop + 1 and drained(), opts.drain,
                 step=opts.interval / 2)
        drain_seconds = round(time.monotonic() - t_drain0, 1)
        alive = stack.poll() is None
        sampler.halt_and_join()
        end_row = sampler.sample() if alive else sampler.rows[-1]
        sampler.close()
        rows = sampler.rows
        ok, checks, totals = verdict(opts, rows, t_traffic, t_stop, baseline_fds, end_row,
                                     reports, alive)
        warm_end = t_traffic + opts.warmup * (t_stop - t_traffic)
        plot_error = None if opts.no_plot else plot(
            rows, {"traffic": t_traffic, "warm_end": warm_end, "stop": t_stop},
            os.path.join(opts.out, "soak.png"))
        with open(dhcp_record) as f:
            dhcp_events = f.read().split()
        last = rows[-1]
        summary = {
            "ok": ok, "checks": checks, "traffic": totals,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "traffic_seconds": round(t_stop - t_traffic, 1), "interval": opts.interval,
            "warmup_fraction": opts.warmup, "rss_tolerance": opts.rss_tolerance,
            "drain_seconds": drain_seconds, "cpu_seconds": last["cpu_s"],
            "log_kib": last["log_kib"], "frames_in": last["frames_in"],
            "frames_out": last["frames_out"], "drops": last["drops"],
            "dhcp_events": {e: dhcp_events.count(e) for e in ("deconfig", "bound", "renew")},
            "plot": None if opts.no_plot else (plot_error or "soak.png"),
            "samples": len(rows), "host": platform.node(), "cpus": os.cpu_count(),
            "log_lines": log_lines(log_path),
            "stack_command": " ".join(cmd[:-2]),
            "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        }
        text = write_summary(opts.out, summary)
        print(text)
        if not alive:
            print(f"the stack died: {log_tail(log_path)}", file=sys.stderr)
        return 0 if ok else 1
    finally:
        for load in loads.values():
            if load.proc.poll() is None:
                load.proc.kill()
        if sampler is not None:
            sampler.halt.set()
        common.cleanup()
        if opts.keep_logs:
            for name in ("stack.log", "load.log"):
                if os.path.exists(os.path.join(tmp, name)):
                    shutil.copy(os.path.join(tmp, name), os.path.join(opts.out, name))
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    common.install_signal_handlers()
    try:
        return soak(opts)
    except KeyboardInterrupt:
        print("soak: interrupted; everything it started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
