#!/usr/bin/env bash
# Benchmarks: arcbox-net against slirp4netns, pasta and the kernel (veth), every
# workload, 3 rounds; writes bench/results/latest.{md,json} and PNG plots.
#
#   ./bench/run.sh            full run (root, about 10 minutes)
#   ./bench/run.sh --smoke    quick check (< 2 minutes) into bench/results/smoke/
#   ./bench/run.sh --micro    only the micro-benchmarks (bench/micro, no root needed)
#   ./bench/run.sh --help     every option
#
# Installs what it needs first, idempotently: Debian's slirp4netns, passt (pasta),
# QEMU (the VM-transport relay), rootlesskit and uidmap (the rootless rows), iperf3 and
# iproute2, the project's .venv
# (scripts/setup.sh), and matplotlib and pytest-benchmark into that venv.
set -euo pipefail
cd "$(dirname "$0")/.."

micro=false
for arg in "$@"; do
  [ "$arg" = "--micro" ] && micro=true
done

if ! $micro; then
  APT_PACKAGES=(iproute2 iperf3 slirp4netns passt qemu-system-x86 rootlesskit uidmap)
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# The project's venv with arcbox-net (editable, from this tree) and every dependency
# pyproject.toml names today, the fast extra (numpy) included: the bench measures with
# it. scripts/setup.sh makes or completes it.
venv_ok() {
  [ -x .venv/bin/twistd ] && .venv/bin/python -c '
import importlib.metadata, re, tomllib
import arcbox_net
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["fast"]:
        importlib.metadata.version(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])
' 2>/dev/null
}
if ! venv_ok; then
  ./scripts/setup.sh
fi
if ! .venv/bin/python -c 'import matplotlib, pytest_benchmark' 2>/dev/null; then
  echo "bench: installing matplotlib and pytest-benchmark into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check matplotlib pytest-benchmark
fi

if $micro; then
  exec .venv/bin/python -m pytest bench/micro -p no:cacheprovider
fi
exec .venv/bin/python -m bench.driver "$@"
