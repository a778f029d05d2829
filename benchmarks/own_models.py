"""Decode speed of models of one's own: lmrt fp32 and int8 against the same module stepped in
PyTorch eager mode with its state carried, the way a user writes the loop.

    python benchmarks/own_models.py                 # writes its section of docs/benchmarks.md
    python benchmarks/own_models.py --tokens 8 --runs 1 --docs /tmp/benchmarks.md

Models (random weights, a word-level vocabulary of ``VOCAB`` tokens): an LSTM and a 2-layer GRU
(recurrent: lmrt carries their state), a GPT with its own KV cache (a declared kv state), and the
same GPT without a cache (stateless: lmrt and PyTorch both re-run the window each step; its row
against the cached GPT's is the cost of re-running). Each figure: greedy tokens/s after the first
token, batch 1, median of ``--runs``; torch and onnxruntime each on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import DOCS, machine, write_section  # noqa: E402
from timing import steady_decode_speed  # noqa: E402

from lmrt.export import export_model  # noqa: E402
from lmrt.runtime import Generator  # noqa: E402

VOCAB = 512
HEADS, HEAD_SIZE, BLOCK = 4, 32, 256


class RecurrentLM(nn.Module):
    """forward(ids, hx=None) -> (logits, hx): a user's own step loop passes hx back."""

    def __init__(self, layer: type, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 128)
        self.rnn = layer(128, 256, num_layers=layers, batch_first=True)
        self.head = nn.Linear(256, VOCAB)

    def forward(self, ids, hx=None):
        out, hx = self.rnn(self.embedding(ids), hx)
        return self.head(out), hx


class CachedGPT(nn.Module):
    """forward(ids, state=None) -> (logits, state): a GPT written by hand with its own KV cache."""

    def __init__(self, layers: int = 2):
        super().__init__()
        dim = HEADS * HEAD_SIZE
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(BLOCK, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.register_buffer("mask", torch.tril(torch.ones(BLOCK, BLOCK)).bool())

    def forward(self, ids, state=None):
        b, t = ids.shape
        if state is None:
            state = [(torch.zeros(b, HEADS, 0, HEAD_SIZE), torch.zeros(b, HEADS, 0, HEAD_SIZE)) for _ in self.qkv]
        held = state[0][0].shape[2]
        x = self.tok(ids) + self.pos(torch.arange(held, held + t))
        new = []
        for (past_k, past_v), qkv, mlp in zip(state, self.qkv, self.mlp):
            q, k, v = (z.reshape(b, t, HEADS, HEAD_SIZE).transpose(1, 2) for z in qkv(x).split(HEADS * HEAD_SIZE, dim=-1))
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            att = (q @ k.transpose(-2, -1) / HEAD_SIZE**0.5).masked_fill(~self.mask[held : held + t, : held + t], float("-inf"))
            x = x + (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
            x = x + mlp(x)
            new.append((k, v))
        return self.head(x), new


class StatelessGPT(nn.Module):
    """forward(ids) -> logits: the cached GPT's weights, run over the whole sequence each time."""

    def __init__(self, gpt: CachedGPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, ids):
        return self.gpt(ids, None)[0]


def torch_speed(module: nn.Module, prompt: list[int], tokens: int, stateless: bool) -> float:
    """Greedy tokens/s of the user's loop: the prompt once, then one token at a time with the state
    carried (a stateless module: the whole sequence again)."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = module(ids) if stateless else module(ids, None)
        logits, state = (out, None) if stateless else out
        first = None
        for _ in range(tokens):
            token = logits[0, -1].argmax().view(1, 1)
            if first is None:
                first = time.perf_counter()
            if stateless:
                ids = torch.cat([ids, token], 1)
                logits = module(ids)
            else:
                logits, state = module(token, state)
    return (tokens - 1) / (time.perf_counter() - first)


def lmrt_speed(gen: Generator, prompt: list[int], tokens: int) -> float:
    return steady_decode_speed(gen, prompt, gen.config(max_new_tokens=tokens, stop_token_ids=[], speculation="off"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--docs", default=DOCS, help="the page whose section this script writes")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    vocab = [f"w{i}" for i in range(VOCAB)]
    prompt = torch.randint(0, VOCAB, (args.prompt,)).tolist()
    cached = CachedGPT().eval()
    models = {
        "LSTM (recurrent)": (RecurrentLM(nn.LSTM, 1).eval(), False),
        "GRU, 2 layers (recurrent)": (RecurrentLM(nn.GRU, 2).eval(), False),
        "GPT with its KV cache (declared kv)": (cached, False),
        "GPT without a cache (stateless window)": (StatelessGPT(cached).eval(), True),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "eval.txt")
        with open(text, "w") as f:
            f.write(" ".join(vocab[i] for i in torch.randint(0, VOCAB, (4096,)).tolist()))
        for name, (module, stateless) in models.items():
            gens = {}
            for precision in ("fp32", "int8"):
                out = os.path.join(tmp, f"{len(rows)}-{precision}")
                extra = {"eval_text": text} if precision == "int8" else {}
                export_model(module, out, tokenizer=vocab, precision=precision, progress=lambda line: None, **extra)
                gens[precision] = Generator(out, provider="cpu", threads=args.threads)
            speeds = {"torch": [], "fp32": [], "int8": []}
            for _ in range(args.runs):  # interleaved, so a slow moment of the machine hits each alike
                speeds["torch"].append(torch_speed(module, prompt, args.tokens, stateless))
                for precision, gen in gens.items():
                    speeds[precision].append(lmrt_speed(gen, prompt, args.tokens))
            s = {k: statistics.median(v) for k, v in speeds.items()}
            rows.append(f"| {name} | {s['torch']:.0f} | {s['fp32']:.0f} ({s['fp32'] / s['torch']:.1f}x) | "
                        f"{s['int8']:.0f} ({s['int8'] / s['fp32']:.1f}x fp32) |")  # fmt: skip
            print(rows[-1], flush=True)
    table = "\n".join(["| model | PyTorch eager, state carried (tok/s) | lmrt fp32 (tok/s) | lmrt int8 (tok/s) |", "|---|---|---|---|", *rows])
    write_section("own_models", f"""## Models of one's own (benchmarks/own_models.py)

{machine()}; batch 1, a {args.prompt}-token prompt, {args.tokens} greedy tokens, median of {args.runs} runs,
{args.threads} thread(s) for torch and onnxruntime alike; random weights, a vocabulary of {VOCAB}.

{table}
""", args.docs)


if __name__ == "__main__":
    main()
