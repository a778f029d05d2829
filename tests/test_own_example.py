"""examples/own_lstm.py, run as a user runs it (a few training steps): it trains, exports to int8
behind the gate, and prints the text the exported model generates."""

from __future__ import annotations

import os
import subprocess
import sys

from lmrt.runtime import Generator
from lmrt.runtime.manifest import load_manifest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "own_lstm.py")


def test_the_lstm_example_trains_exports_to_int8_and_generates(tmp_path):
    out = tmp_path / "lstm"
    args = [sys.executable, EXAMPLE, "--steps", "3", "--out", str(out), "--prompt", "The runtime ", "--tokens", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = load_manifest(str(out))
    assert manifest.quantization["name"] == "int8" and manifest.quality["passed"]
    assert [s.kind for s in manifest.graph.state] == ["fixed", "fixed"] and manifest.graph.state[0].shape == (2, 128)
    sampling = dict(temperature=0.7, top_k=20, seed=0, stop_token_ids=[])  # the example's
    generated = Generator(str(out), provider="cpu").generate("The runtime ", max_new_tokens=20, **sampling)
    assert done.stdout.endswith("The runtime " + generated + "\n")
