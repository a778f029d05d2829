"""How often prompt-lookup speculation changes greedy output on a quantized model: many varied
prompts, greedy, speculation on vs off; writes the "speculation-agreement" section of
docs/benchmarks.md.

A model quantized with --compute int8 rounds its activations to int8 per block. Exported without the
scratch attention row (an older lmrt, or --target ort-1.19), a pass that checks several positions at
once gives logits a little different from single steps there, and a near tie can flip; with it the
two are equal bit for bit (benchmarks/verify_exactness.py). This script measures what shows in the
tokens. The prompts are built here: grounded
tasks (rewrite, correct, annotate, convert or quote a passage of this repository's docs and code)
and open-ended prose. Each prompt runs through the chat template, greedy, --new-tokens tokens, once
with speculation "on" and once "off", each from an empty cache (a fresh state store on one loaded
model), so both read the prompt the same way. Reported per precision: the share of tokens produced
before the first divergence (the tokens of "off" up to where "on" first differs, over all of "off"),
the share identical position by position over the whole outputs, the prompts whose outputs are
identical, where outputs first diverge and by what margin the model preferred its token there, and
the teacher-forced perplexity of an evaluation text (scoring reads text in one pass per chunk and
never speculates, so it is the same number with speculation on or off: one figure is given).

    python benchmarks/speculation_agreement.py --lmrt int8=models/smol-int8 --lmrt int4=models/smol-int4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import date

from report import machine, write_section
from speculation import passage

PROSE = [  # (name, file, first line, lines)
    ("cache", "docs/runtime.md", "## The cache", 9),
    ("memory", "docs/runtime.md", "## Memory", 14),
    ("engine", "docs/serving.md", "## The engine", 20),
    ("contract", "docs/own-models.md", "## The contract", 13),
    ("longrope", "docs/architectures.md", "## Sliding windows and LongRoPE", 11),
    ("quantization", "docs/quantization.md", "# Quantization", 20),
    ("extras", "docs/installing.md", "## Extras", 18),
]
PROSE_TASKS = [
    ("correct", "Rewrite this text with every spelling mistake corrected. Output the whole text."),
    ("you", "Rewrite this text addressing the reader as 'you'. Keep everything else the same."),
    ("bullets", "Turn this text into a bulleted list, one sentence per bullet, keeping every word."),
    ("summary", "Summarize this text in a few sentences, reusing its wording."),
]
CODE = [
    ("stopping", "runtime/stopping.py", None, 50),
    ("checks", "runtime/checks.py", None, 24),
    ("scheduler", "runtime/scheduler.py", "class Scheduler", 45),
    ("lookup", "runtime/speculation.py", "class PromptLookup", 45),
    ("text stream", "runtime/text_stream.py", None, 50),
    ("report", "benchmarks/report.py", None, 40),
]
CODE_TASKS = [
    ("type hints", "Add type hints to every function in this Python code and output the whole code."),
    ("comments", "Output this Python code again with a one-line comment above each function."),
    ("no docstrings", "Output this Python code again with every docstring removed."),
]
TABLES = [
    ("routes to CSV", "Convert this Markdown table to CSV.", ("docs/serving.md", "| route | what |", 9)),
    ("options to list", "Turn this table into a bulleted list, one option per bullet, keeping every word.",
     ("docs/serving.md", "| option | default | what |", 11)),
]  # fmt: skip
OPEN_ENDED = [
    ("story", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("essay", "Write a few paragraphs on why people enjoy gardening."),
    ("letter", "Write a friendly letter to a neighbour inviting them to a summer barbecue."),
    ("poem", "Write a poem about the sea in winter."),
    ("recipe", "Describe how to bake a loaf of bread at home, step by step."),
    ("travel", "Describe a week-long trip through the mountains of northern Italy."),
    ("history", "Explain how the printing press changed Europe."),
    ("science", "Explain to a child why the sky is blue."),
    ("advice", "Give advice to someone starting their first job as a programmer."),
    ("review", "Write a review of an imaginary café that serves only soup."),
    ("dialogue", "Write a conversation between a cat and a dog about who is the better pet."),
    ("speech", "Write a short speech for a school's graduation day."),
    ("fable", "Write a fable about a fox and a crow with a moral at the end."),
    ("diary", "Write a diary entry of an astronaut on her first day on the Moon."),
]


def prompts() -> list[tuple[str, str, str]]:
    """(kind, name, user message) for every prompt: grounded ones first."""
    out = []
    for name, path, start, lines in PROSE:
        text = passage(path, start, lines)
        out += [("grounded", f"{name}: {task}", f"{ask}\n\n{text}") for task, ask in PROSE_TASKS]
    for name, path, start, lines in CODE:
        text = passage(path, start, lines)
        out += [("grounded", f"{name}: {task}", f"{ask}\n\n{text}") for task, ask in CODE_TASKS]
    out += [("grounded", name, f"{ask}\n\n{passage(*where)}") for name, ask, where in TABLES]
    out += [("open-ended", name, ask) for name, ask in OPEN_ENDED]
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def same_positions(a: list[int], b: list[int]) -> int:
    """Positions where ``a`` and ``b`` hold the same token."""
    return sum(x == y for x, y in zip(a, b))


def margin(model, ids: list[int]) -> float:
    """The gap between the two likeliest next tokens' logits after ``ids`` (one pass)."""
    import numpy as np

    last = model.sequence_logits(ids)[-1]
    top2 = np.partition(last, -2)[-2:]
    return float(top2[1] - top2[0])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lmrt", action="append", default=[], metavar="PRECISION=DIR")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--eval-chars", type=int, default=12_000, help="characters of the evaluation text to score")
    p.add_argument("--chunk", type=int, default=0,
                   help="also run without speculation reading the prompt in chunks of this many tokens (0: not)")
    p.add_argument("--output", default=None)
    return p.parse_args()


def measure(model_dir: str, args) -> dict:
    from lmrt.quantize.evaltext import reference_text
    from lmrt.runtime import Generator
    from lmrt.runtime.engine_settings import PREFILL_CHUNK
    from lmrt.runtime.model import LoadedModel

    model = LoadedModel(model_dir, threads=args.threads)
    rows = []
    items = prompts()
    for i, (kind, name, message) in enumerate(items):
        ids = model.chat_prompt([{"role": "user", "content": message}])
        runs = {}
        for mode, chunk in (("off", PREFILL_CHUNK), ("on", PREFILL_CHUNK), *((("chunked", args.chunk),) if args.chunk else ())):
            gen = Generator(model, prefill_chunk=chunk)  # an empty cache: every run reads the prompt afresh
            config = gen.config(max_new_tokens=args.new_tokens, temperature=0.0, speculation="on" if mode == "on" else "off")
            tokens = list(gen.iter_tokens(ids, config))
            runs[mode] = (tokens, gen.stats.proposed_tokens, gen.stats.accepted_tokens)
        off, on = runs["off"][0], runs["on"][0]
        prefix = common_prefix(off, on)
        row = {"kind": kind, "name": name, "prompt_tokens": len(ids), "off": len(off), "on": len(on), "prefix": prefix,
               "same": same_positions(off, on), "identical": off == on, "proposed": runs["on"][1], "accepted": runs["on"][2]}  # fmt: skip
        if "chunked" in runs:
            row["chunked_prefix"], row["chunked_identical"] = common_prefix(off, runs["chunked"][0]), off == runs["chunked"][0]
        if not row["identical"] and prefix < min(len(off), len(on)):
            row["margin"] = margin(model, ids + off[:prefix])
        rows.append(row)
        print(f"[{i + 1}/{len(items)}] {kind} {name}: {prefix}/{len(off)} before the first divergence, "
              f"{'identical' if off == on else 'differs'}", file=sys.stderr, flush=True)  # fmt: skip
    gen = Generator(model)
    score = gen.score(reference_text(args.eval_chars), window=512, stride=256)
    return {"rows": rows, "perplexity": score.perplexity, "scored": score.num_scored,
            "compute": model.manifest.quantization.get("compute", "float")}  # fmt: skip


def summary(rows: list[dict]) -> dict:
    """The figures of a set of prompts' rows."""
    total_off = sum(r["off"] for r in rows)
    longest = sum(max(r["off"], r["on"]) for r in rows)
    proposed = sum(r["proposed"] for r in rows)
    return {
        "prompts": len(rows),
        "prefix_share": sum(r["prefix"] for r in rows) / total_off if total_off else float("nan"),
        "same_share": sum(r["same"] for r in rows) / longest if longest else float("nan"),
        "identical": sum(r["identical"] for r in rows),
        "acceptance": sum(r["accepted"] for r in rows) / proposed if proposed else float("nan"),
        "tokens": total_off,
    }


def report(results: dict, args) -> str:
    from lmrt.runtime.engine_settings import PREFILL_CHUNK

    lines = [
        "## Speculation and greedy output on quantized models",
        "",
        f"SmolLM2-135M-Instruct, {len(prompts())} prompts built by the script (grounded: rewrite, correct, annotate, "
        "convert or quote a passage of this repository's docs and code; open-ended: new prose), chat template, greedy, "
        f"up to {args.new_tokens} new tokens, speculation on vs off, each run from an empty cache. "
        "Before the first divergence: the tokens of the run without speculation up to where the run with it first "
        "differs, over all its tokens. Position by position: tokens equal at the same position, over the longer output. "
        "Margin: at a first divergence, how far the model's top logit led the second (one pass over the text so far). "
        "Perplexity is teacher-forced on the quality gate's evaluation text (window 512, stride 256): scoring never "
        "speculates, so it is one number with speculation on or off. A quality measurement: timing played no part, and "
        "it may have run on a busy machine. Written by `benchmarks/speculation_agreement.py`.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
        "",
        "| precision | compute | prompts | kind | before the first divergence | position by position | identical outputs | acceptance |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for precision, res in results.items():
        rows = res["rows"]
        for kind, subset in (("all", rows), *((k, [r for r in rows if r["kind"] == k]) for k in ("grounded", "open-ended"))):
            s = summary(subset)
            lines.append(f"| {precision} | {res['compute']} | {s['prompts']} | {kind} | {s['prefix_share']:.1%} | "
                         f"{s['same_share']:.1%} | {s['identical']} of {s['prompts']} | {s['acceptance']:.0%} |")  # fmt: skip
    lines.append("")
    for precision, res in results.items():
        rows = res["rows"]
        diverged = [r for r in rows if not r["identical"]]
        firsts = sorted(r["prefix"] for r in diverged)
        margins = sorted(r["margin"] for r in diverged if "margin" in r)
        text = f"- {precision}: perplexity {res['perplexity']:.3f} over {res['scored']} tokens."
        if firsts:
            text += (f" {len(diverged)} outputs diverge, first at token {firsts[0]} to {firsts[-1]} (median "
                     f"{statistics.median(firsts):g}).")  # fmt: skip
        if margins:
            text += f" Margin there: median {statistics.median(margins):.3f}, largest {margins[-1]:.3f} (logits)."
        chunked = [r for r in rows if "chunked_prefix" in r]
        if chunked:
            share = sum(r["chunked_prefix"] for r in chunked) / sum(r["off"] for r in chunked)
            text += (f" Without speculation, reading the prompt in chunks of {args.chunk} tokens instead of "
                     f"{PREFILL_CHUNK}: {share:.1%} of tokens before the first divergence, "
                     f"{sum(r['chunked_identical'] for r in chunked)} of {len(chunked)} outputs identical.")  # fmt: skip
        lines.append(text)
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    models = dict(e.split("=", 1) for e in args.lmrt)
    if not models:
        sys.exit("give at least one lmrt model directory (--lmrt int8=DIR)")
    results = {precision: measure(model_dir, args) for precision, model_dir in models.items()}
    markdown = report(results, args)
    write_section("speculation-agreement", markdown, *([args.output] if args.output else []))
    print(markdown)


if __name__ == "__main__":
    main()
