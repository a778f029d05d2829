"""Your own model, start to finish: train a small character-level LSTM language model on this
repository's documentation, export it with lmrt to int8, and generate from it.

    python examples/own_lstm.py                      # trains for --steps 250, writes models/own-lstm
    python examples/own_lstm.py --steps 50 --out /tmp/lstm --prompt "The runtime "

Needs torch and lmrt's export extra. Training runs on the CPU (a minute or less at the default
steps); the int8 export is checked against the fp32 graph's perplexity on a part of the text the
model did not train on.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn

from lmrt.export import export_model
from lmrt.runtime import Generator

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
PAGES = ("index.md", "runtime.md", "own-models.md", "serving.md")
SAMPLING = dict(temperature=0.7, top_k=20, seed=0, stop_token_ids=[])  # seeded: the same text each run


class CharLSTM(nn.Module):
    """The tutorial model: embedding, a 2-layer LSTM, a linear head; forward(ids) -> logits."""

    def __init__(self, vocab: int, width: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 48)
        self.lstm = nn.LSTM(48, width, num_layers=2, batch_first=True, dropout=0.1)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out)


def read_text() -> str:
    return "\n".join(open(os.path.join(DOCS, page), encoding="utf-8").read() for page in PAGES)


def train(model: nn.Module, ids: torch.Tensor, steps: int, seq: int = 64, batch: int = 32) -> float:
    """Adam on random windows of ``ids``; the last step's loss."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        y = torch.stack([ids[s + 1 : s + seq + 1] for s in starts])
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250, help="training steps")
    parser.add_argument("--out", default="models/own-lstm", help="the model directory to write")
    parser.add_argument("--prompt", default="The model ", help="text to continue")
    parser.add_argument("--tokens", type=int, default=120, help="characters to generate")
    args = parser.parse_args()

    text = read_text()
    vocab = sorted(set(text))  # one token per character: lmrt makes it a character-level tokenizer
    ids = torch.tensor([vocab.index(c) for c in text])
    split = int(len(ids) * 0.9)
    model = CharLSTM(len(vocab))
    print(f"training on {split} characters of docs/ ({len(vocab)} distinct) for {args.steps} steps")
    loss = train(model, ids[:split], args.steps)
    print(f"final training loss {loss:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        held_out = os.path.join(tmp, "held_out.txt")
        with open(held_out, "w", encoding="utf-8") as f:
            f.write(text[split:])
        manifest = export_model(model, args.out, tokenizer=vocab, precision="int8", eval_text=held_out, force=True)
    q = manifest.quality
    print(f"int8 perplexity {q['perplexity']:.2f} (fp32 {q['perplexity_reference']:.2f}) on the held-out text")

    gen = Generator(args.out)
    print(f"{args.prompt}{gen.generate(args.prompt, **SAMPLING, max_new_tokens=args.tokens)}")


if __name__ == "__main__":
    main()
