"""iperf3 server and client runs, with the stack's CPU time around each run."""

import json
import time

from .common import cpu_seconds, last_line, run, spawn, stop


class IperfServer:
    """``iperf3 -s`` bound to ``addr``:``port`` in ``ns``; restarted after a failed run."""

    def __init__(self, ns, addr, port):
        self.ns, self.addr, self.port = ns, addr, port
        self.proc = None

    def start(self):
        self.proc = spawn(["iperf3", "-s", "-B", self.addr, "-p", str(self.port)], ns=self.ns)
        time.sleep(0.2)
        return self

    def restart(self):
        stop(self.proc)
        self.start()

    def stop(self):
        stop(self.proc)
        self.proc = None


def client(ns, host, port, duration, reverse=False, streams=1, udp_rate=None, length=None,
           pid=None, relay_pid=None, timeout_extra=15, retries=2):
    """One iperf3 client run; returns (the JSON's ``end``, the stack's CPU seconds,
    the relay's CPU seconds: QEMU or another VMM stand-in, None without one)."""
    cmd = ["iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-J",
           "--connect-timeout", "5000"]
    if reverse:
        cmd.append("-R")
    if streams > 1:
        cmd += ["-P", str(streams)]
    if udp_rate:
        cmd += ["-u", "-b", udp_rate]
    if length:
        cmd += ["-l", str(length)]
    for attempt in range(retries + 1):
        cpu_before, relay_before = cpu_seconds(pid), cpu_seconds(relay_pid)
        result = run(cmd, ns=ns, timeout=duration + timeout_extra)
        cpu_after, relay_after = cpu_seconds(pid), cpu_seconds(relay_pid)
        if result.returncode is None:
            raise RuntimeError(f"iperf3 gave no result within {duration + timeout_extra} s")
        try:
            report = json.loads(result.stdout)
        except ValueError:
            report = {"error": last_line(result.stderr or result.stdout)}
        error = report.get("error")
        if not error and result.returncode == 0:
            cpu = None if cpu_before is None else cpu_after - cpu_before
            relay = None if relay_before is None else relay_after - relay_before
            return report["end"], cpu, relay
        if attempt < retries and ("refused" in str(error) or "busy" in str(error)):
            # The server is still finishing the previous run, or restarting.
            time.sleep(1.0)
            continue
        raise RuntimeError(f"iperf3: {error or last_line(result.stderr)}")


def bulk_metrics(end, cpu, relay_cpu=None, relay_is_stack=False):
    """Throughput and CPU per GB; with a relay also its CPU and the sum of both
    (once when the relay is the stack's own process: QEMU running libslirp)."""
    received = end["sum_received"]
    gb = received["bytes"] / 1e9

    def per_gb(seconds):
        return None if seconds is None or gb == 0 else seconds / gb

    metrics = {"gbps": received["bits_per_second"] / 1e9, "cpu_s_per_gb": per_gb(cpu)}
    if relay_cpu is not None:
        metrics["relay_cpu_s_per_gb"] = per_gb(relay_cpu)
        total = relay_cpu if relay_is_stack or cpu is None else cpu + relay_cpu
        metrics["total_cpu_s_per_gb"] = per_gb(total)
    return metrics
