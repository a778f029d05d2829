#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (the real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The oldest onnxruntime lmrt supports, in its own environment under .compat-envs/: the tiny-model
# fidelity and compatibility tests, graphs exported for its profile (scripts/compat_matrix.py runs
# every release and a real model)
.venv/bin/python scripts/compat_matrix.py --versions 1.19.2
LMRT_REQUIRE_REAL_MODEL=1 .venv/bin/python -m pytest -q "$@"
