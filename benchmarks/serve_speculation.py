"""Prompt-lookup speculation inside the server's batches: 1, 4 and 8 streaming clients on grounded and
open-ended prompts, lmrt serve with speculation off, auto and on; writes the "serve-speculation"
section of docs/benchmarks.md.

The prompts are benchmarks/speculation.py's (grounded: rewrite, correct, convert or quote a passage of
this repository; open-ended: new prose), through the chat template, sent as token ids. Client i
streams prompt i (of its kind, in turn), greedy, exactly --new-tokens tokens (end-of-sequence
ignored), --requests times one after another. One server per client count and setting, as many slots
as clients; the settings run back to back for each client count. Aggregate tokens/s counts every
streamed token over the run.

    python benchmarks/serve_speculation.py models/smol-int8
"""

from __future__ import annotations

import argparse
import os
from datetime import date
from types import SimpleNamespace

from report import machine, write_section
from serve_load import load_run, start, stream
from speculation import OPEN_ENDED, grounded_prompts

SETTINGS = ("off", "auto", "on")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=2, help="requests each client makes, one after another")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--output", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from lmrt.runtime import Generator

    gen = Generator(args.model_dir)
    chat = lambda text: gen.chat_prompt([{"role": "user", "content": text}])  # noqa: E731
    kinds = {"grounded": [chat(t) for _, t in grounded_prompts()], "open-ended": [chat(t) for _, t in OPEN_ENDED]}
    ctx = max(len(p) for ps in kinds.values() for p in ps) + args.new_tokens + 16
    name = os.path.basename(os.path.abspath(args.model_dir))
    server_args = SimpleNamespace(threads=args.threads)
    table: dict = {}
    for clients in args.clients:
        for setting in SETTINGS:
            print(f"{clients} clients, speculation {setting}", flush=True)
            server = start("lmrt", args.model_dir, clients, server_args, ctx)
            try:
                stream(server.port, {"model": name, "prompt": kinds["open-ended"][0], "max_tokens": 8, "temperature": 0})
                for kind, prompts in kinds.items():
                    body = lambda i, r, prompts=prompts, setting=setting: {  # noqa: E731 - client i's r-th prompt of the kind, in turn
                        "model": name, "prompt": prompts[(i + r * clients) % len(prompts)], "max_tokens": args.new_tokens,
                        "temperature": 0, "ignore_eos": True, "speculation": setting,
                    }  # fmt: skip
                    result = table[(kind, clients, setting)] = load_run(server.port, body, clients, args.requests)
                    if result["errors"]:
                        raise SystemExit(f"{result['errors']} requests failed ({kind}, {clients} clients, speculation {setting})")
            finally:
                server.stop()
    markdown = report(table, args)
    write_section("serve-speculation", markdown, *([args.output] if args.output else []))
    print(markdown)


def report(table: dict, args) -> str:
    lines = [
        "## Serving: prompt-lookup speculation in the batches",
        "",
        f"`lmrt serve` on {os.path.basename(os.path.abspath(args.model_dir))}, as many slots as clients, {args.threads} "
        f"threads. Each client streams {args.requests} chat prompts of benchmarks/speculation.py one after another, "
        f"greedy, exactly {args.new_tokens} new tokens; aggregate tokens/s over the run, and the p95 gap between "
        "tokens of one stream (a check pass brings several tokens at once, after a longer gap). Written by "
        "`benchmarks/serve_speculation.py`.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
        "",
        "| prompts | clients | off | auto | on | auto ÷ off | on ÷ off | gap p95 off / auto / on (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("grounded", "open-ended"):
        for clients in args.clients:
            r = {s: table[(kind, clients, s)] for s in SETTINGS}
            rate = {s: r[s]["tokens_per_s"] for s in SETTINGS}
            gaps = " / ".join(f"{r[s]['itl_p95'] * 1e3:.0f}" for s in SETTINGS)
            lines.append(
                f"| {kind} | {clients} | {rate['off']:.1f} | {rate['auto']:.1f} | {rate['on']:.1f} | "
                f"{rate['auto'] / rate['off']:.2f}× | {rate['on'] / rate['off']:.2f}× | {gaps} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
