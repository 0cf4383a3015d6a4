#!/usr/bin/env bash
# Run the whole test suite (real-guest tests need root). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
