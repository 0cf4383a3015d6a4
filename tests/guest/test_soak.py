"""The soak (bench/soak.py) in 15 seconds, so the script cannot rot.

The 10-minute run is documented in docs/performance.md ("Soak"); here every kind
of traffic must run and succeed against the real stack, the samples and the
verdict must be written, the fds left at the end must be accounted for by live
flows (the 180 s UDP drain is too long to wait for here), and the soak must leave
no namespace or stack behind.
"""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, require_root


@pytest.mark.realguest
def test_soak_smoke_runs_every_traffic_kind_and_writes_a_verdict(tmp_path):
    require_root()
    out = tmp_path / "soak"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.soak", "--seconds", "15", "--interval", "1",
         "--drain", "5", "--burst", "2", "--burst-gap", "1", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=120)
    # 0: no growth; 1: a check failed (here the drain is cut short on purpose).
    assert proc.returncode in (0, 1), f"soak failed to run:\n{stdout}\n{stderr[-4000:]}"

    summary = json.loads((out / "summary.json").read_text())
    checks = summary["checks"]
    assert checks["alive"]["ok"], checks["alive"]
    assert checks["held"]["ok"], checks["held"]
    assert checks["rss"]["first_half_peak_mib"] > 0 and checks["rss"]["second_half_peak_mib"] > 0
    assert summary["ok"] == all(c["ok"] for c in checks.values() if "ok" in c)
    assert proc.returncode == (0 if summary["ok"] else 1)
    traffic = summary["traffic"]
    for kind in ("guest_bulk", "forward_bulk", "guest_short_tcp", "forward_short_tcp",
                 "guest_udp_flows", "forward_udp_flows", "dns_udp", "dns_tcp", "ping_gateway",
                 "ping_mapped", "api", "garbage_frames"):
        assert traffic[kind]["ok"] > 0, (kind, traffic[kind])
    for kind in ("guest_short_tcp", "dns_udp", "dns_tcp", "ping_mapped", "api"):
        assert traffic[kind]["fail"] == 0, (kind, traffic[kind])
    assert summary["dhcp_events"]["bound"] == 1 and summary["dhcp_events"]["renew"] >= 1

    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    phases = {r["phase"] for r in rows}
    assert {"baseline", "traffic", "drain"} <= phases, phases
    assert all(float(r["rss_mib"]) > 0 and int(r["fds"]) > 0 for r in rows)
    assert max(int(r["fds"]) for r in rows) > int(rows[0]["fds"])   # the traffic held sockets
    assert "# Soak" in (out / "summary.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "soak.png").stat().st_size > 0

    # Nothing left running: the soak names its namespace by its pid, and that name is
    # on the command lines of the stack (--netns) and of both load processes.
    tag = f"abxs-{proc.pid}"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False).stdout
    assert tag not in netns
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                        check=False).stdout
    assert not [line for line in ps.splitlines() if tag in line], ps
