"""Embedding lmrt in an application: load once, answer many requests, stream the text.

    python examples/embed_generator.py models/smollm2-135m-instruct

Needs only lmrt's runtime (numpy, onnxruntime, tokenizers, jinja2), not torch.
"""

from __future__ import annotations

import sys
import time

from lmrt import runtime


def answer(gen: runtime.Generator, question: str) -> None:
    """Stream one chat answer and report how it ended."""
    prompt = gen.chat_prompt([{"role": "user", "content": question}])
    start = time.perf_counter()
    stream = gen.stream(prompt, max_new_tokens=64, stop=["\n\n"])
    print(f"Q: {question}\nA: ", end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n   [{len(stream.token_ids)} tokens in {elapsed:.2f}s, finish: {stream.finish_reason}]\n")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} MODEL_DIR")
    try:
        gen = runtime.Generator(sys.argv[1])  # provider="auto": TensorRT, then CUDA, then CPU
    except (runtime.ManifestError, runtime.ProviderError) as e:
        sys.exit(f"error: {e}")
    print(f"loaded {sys.argv[1]} on {gen.provider}\n")
    for question in ["What is the capital of France?", "Name three primary colors."]:
        answer(gen, question)
    # Plain completion with sampling, reproducible through the seed.
    print(gen.generate("Once upon a time", max_new_tokens=32, temperature=0.7, top_p=0.9, seed=42))


if __name__ == "__main__":
    main()
