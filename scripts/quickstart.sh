#!/usr/bin/env bash
# End to end on a fresh machine: install, fetch SmolLM2-135M-Instruct, export it to int8, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=models/smollm2-135m-instruct-int8
if ! .venv/bin/lmrt info "$MODEL" >/dev/null 2>&1; then  # missing, or written by an older lmrt
    .venv/bin/lmrt export "$(.venv/bin/python scripts/smollm2_path.py)" -o "$MODEL" --int8 --force
fi
.venv/bin/lmrt info "$MODEL"
echo
.venv/bin/lmrt generate "$MODEL" "The capital of France is" --max-new-tokens 24 --stats
.venv/bin/lmrt generate "$MODEL" "What is the capital of France?" --chat --system "Answer in one short sentence." -n 48 --stats
