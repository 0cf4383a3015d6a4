#!/usr/bin/env bash
# Install what arcbox-net's demo and tests need, idempotently (Debian, as root):
# the real guest-side tools from apt and a Python venv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# lz4: tests/vmguest.py unpacks the test VM's kernel with it (the kernel and busybox-static
# themselves are fetched with apt-get download, never installed: busybox-static conflicts
# with busybox).
# rootlesskit, podman (with runc), uidmap (newuidmap) and slirp4netns:
# tests/guest/test_slirp4netns_dropin.py runs rootlesskit and rootless Podman unprivileged
# around arcbox-net-slirp4netns and the real slirp4netns.
# isc-dhcp-client (dhclient -6) and ndisc6 (rdisc6, a reader of RDNSS/DNSSL):
# tests/guest/test_ipv6.py's DHCPv6 client and router-advertisement check.
APT_PACKAGES=(iproute2 busybox iputils-ping dnsutils curl socat iperf3 qemu-system-x86 lz4 tshark python3 python3-venv rootlesskit podman runc uidmap slirp4netns isc-dhcp-client ndisc6)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# An editable install in compat mode: twistd finds the plugin from the source tree.
# The fast extra (numpy) too: the tests check both checksum paths, and the bench measures with it.
.venv/bin/python -m pip install -q --disable-pip-version-check \
  --config-settings editable_mode=compat -e '.[test,fast]'
