"""The benchmark's smoke mode runs end to end against arcbox-net and slirp4netns
(and three arcbox-net variants: two queues, without busy polling, which runs the
latency workloads only, and behind QEMU's -netdev stream).

``./bench/run.sh --smoke`` (1 round, 1 s each, MTU 1500, small N) into a
temporary folder; the JSON must have TCP bulk figures both ways for both stacks,
and the markdown table and plots must be written.
"""

import json
import os
import subprocess

import pytest

from conftest import REPO, require_root


@pytest.mark.realguest
def test_bench_smoke_has_tcp_bulk_both_ways(tmp_path):
    require_root()
    proc = subprocess.Popen(
        [os.path.join(REPO, "bench", "run.sh"), "--smoke", "--stacks",
         "arcbox-net,arcbox-net-2q,arcbox-net-nopoll,arcbox-net-qemu,slirp4netns",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 0, f"bench smoke failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    with open(tmp_path / "latest.json") as f:
        data = json.load(f)
    assert data["meta"]["mode"] == "smoke"
    summary = {(e["workload"], e["stack"]): e for e in data["summary"]}
    for stack in ("arcbox-net", "arcbox-net-2q", "arcbox-net-qemu", "slirp4netns"):
        for workload in ("tcp_up_1", "tcp_down_1"):
            entry = summary[(workload, stack)]
            gbps = entry["metrics"].get("gbps")
            assert isinstance(gbps, float) and gbps > 0, (workload, stack, entry)
    variant = {e["workload"] for e in data["summary"] if e["stack"] == "arcbox-net-nopoll"}
    assert variant == {"tcp_rr", "conn_rate"}, variant
    assert summary[("tcp_rr", "arcbox-net-nopoll")]["metrics"]["median_us"] > 0
    # Every workload has a figure or says why not.
    for entry in data["summary"]:
        assert entry["rounds_ok"] or entry["errors"], entry
    for name in ("latest.md", "throughput.png", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "latest.md").read_text()
    assert "| TCP guest→host, 1 stream | 1500 | Gbit/s |" in table
    assert "arcbox-net --queues 2" in table and "--queues 2 / slirp4netns" in table
    # run.sh execs the driver, whose pid names its namespaces (another bench
    # running beside this one has its own).
    left = bench_namespaces(proc.pid)
    assert not left, f"the benchmark left namespaces behind: {left}"


def bench_namespaces(pid):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(f"abxb-{pid}-")}
