#!/usr/bin/env bash
# Demo: a namespace guest served by arcbox-net leases an address and pings its gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m arcbox_net.demo "$@"
