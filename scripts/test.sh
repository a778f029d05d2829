#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (the real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LMRT_REQUIRE_REAL_MODEL=1 .venv/bin/python -m pytest -q "$@"
