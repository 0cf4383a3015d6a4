"""The benchmark's rootlesskit rows run end to end and leave nothing behind.

``./bench/run.sh --smoke`` with the two rootlesskit stacks (arcbox-net-slirp4netns
and Debian's slirp4netns as rootlesskit's network binary, run rootless by a user
the bench makes) and the one-stream bulk workloads: both must move data both
ways, and afterwards the bench's user, its namespaces and its processes must be
gone (the /dev/net/tun mode is not checked: the drop-in test sets and restores
it too, and may run beside this one on a shared machine).
"""

import json
import os
import pwd
import shutil
import subprocess

import pytest

from conftest import REPO, require_root

USER = "arcbox-bench"      # bench/rootless.py's user


@pytest.mark.realguest
def test_bench_rootlesskit_rows(tmp_path):
    require_root()
    for tool in ("rootlesskit", "newuidmap", "slirp4netns"):
        if shutil.which(tool) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{tool} is missing; scripts/setup.sh should have installed it")
            pytest.skip(f"{tool} is not installed")
    proc = subprocess.Popen(
        [os.path.join(REPO, "bench", "run.sh"), "--smoke", "--stacks",
         "arcbox-net-rootlesskit,slirp4netns-rootlesskit", "--workloads", "tcp_up_1,tcp_down_1",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"bench smoke failed:\n{stdout}\n{stderr[-4000:]}"
    with open(tmp_path / "latest.json") as f:
        data = json.load(f)
    summary = {(e["workload"], e["stack"]): e for e in data["summary"]}
    for stack in ("arcbox-net-rootlesskit", "slirp4netns-rootlesskit"):
        for workload in ("tcp_up_1", "tcp_down_1"):
            entry = summary[(workload, stack)]
            gbps = entry["metrics"].get("gbps")
            assert isinstance(gbps, float) and gbps > 0, (workload, stack, entry, stderr[-3000:])
            assert entry["metrics"].get("cpu_s_per_gb", 0) > 0, (workload, stack, entry)
    table = (tmp_path / "latest.md").read_text()
    assert "arcbox-net via rootlesskit" in table
    assert "via rootlesskit / slirp4netns via rootlesskit" in table
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [line.split()[0] for line in out.splitlines() if line.startswith(f"abxb-{proc.pid}-")]
    assert not left, f"the benchmark left namespaces behind: {left}"
    with pytest.raises(KeyError):
        pwd.getpwnam(USER)
