"""Prompt-lookup speculation on one stream: grounded tasks and open-ended prose, lmrt with and
without speculation and llama.cpp at the same precision; writes the "speculation" section of
docs/benchmarks.md.

The grounded prompts ask SmolLM2 to rewrite, correct, annotate, convert or extract from a passage of
300 to 800 tokens (prose and code from this repository, so nothing is copied from elsewhere); the
open-ended ones ask for new prose. Each prompt goes through the chat template, greedy, up to
--new-tokens tokens. lmrt runs in this process (speculation auto, then off: the same tokens); llama.cpp
is llama-server with one slot, fed the same token ids, and timed by its own `timings`. Decode speed
counts the tokens after the first. Runs are interleaved; medians over --runs. Speculation is "auto",
which must give the tokens of "off" (the script stops if not), except on an int8-compute graph
exported without the scratch attention row (an older lmrt): "auto" keeps speculation off there, so
it is asked for ("on"), and its greedy output may differ at near ties: the table says where it did.

    python benchmarks/speculation.py --lmrt int8=models/smol-int8 --lmrt int4=models/smol-int4 \\
        --llama-server BUILD/bin/llama-server --gguf int8=smol-q8_0.gguf --gguf int4=smol-q4_1.gguf
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date

from report import ROOT, machine, write_section


def passage(path: str, start: str | None = None, lines: int = 60) -> str:
    """``lines`` lines of a file of this repository, from the first line starting with ``start``."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read().splitlines()
    first = next((i for i, line in enumerate(text) if line.startswith(start)), None) if start else 0
    if first is None:
        raise SystemExit(f"{path} has no line starting with {start!r}")
    return "\n".join(text[first : first + lines])


def grounded_prompts() -> list[tuple[str, str]]:
    """(name, user message) for tasks whose answer repeats much of the passage."""
    serving = passage("docs/serving.md", "How it works.", 18)
    quantization = passage("docs/quantization.md", "# Quantization", 30)
    layout = passage("docs/layout.md", "## Layout", 40)
    stopping = passage("runtime/stopping.py", lines=80)
    report = passage("benchmarks/report.py", lines=40)
    scheduler = passage("runtime/scheduler.py", "class Scheduler", 50)
    routes = passage("docs/serving.md", "| route | what |", 9)
    options = passage("docs/serving.md", "| option | default | what |", 11)
    return [
        ("correct prose", f"Rewrite this text with every spelling mistake corrected. Output the whole text.\n\n{serving}"),
        ("second person", f"Rewrite this text addressing the reader as 'you'. Keep everything else the same.\n\n{quantization}"),
        ("type hints", f"Add type hints to every function in this Python module and output the whole module.\n\n{stopping}"),
        ("rename", f"Rename `find_stop` to `first_stop` everywhere in this code and output the whole file.\n\n{stopping}"),
        ("docstrings", f"Output this Python code again with a one-line comment above each function.\n\n{report}"),
        ("comments", f"Add a comment to the end of each method's first line in this class and output the class.\n\n{scheduler}"),
        ("table to CSV", f"Convert this Markdown table to CSV.\n\n{routes}"),
        ("options to list", f"Turn this table into a bulleted list, one option per bullet, keeping every word.\n\n{options}"),
        ("file list", f"List every file name mentioned in this text with what it does, one per line.\n\n{layout}"),
        ("quote", f"Quote, word for word, every sentence of this text that mentions memory or the cache.\n\n{serving}"),
        ("summary", f"Summarize this text in a few sentences, reusing its wording.\n\n{quantization}"),
    ]


OPEN_ENDED = [
    ("story", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("essay", "Write a few paragraphs on why people enjoy gardening."),
    ("letter", "Write a friendly letter to a neighbour inviting them to a summer barbecue."),
    ("poem", "Write a poem about the sea in winter."),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lmrt", action="append", default=[], metavar="PRECISION=DIR")
    p.add_argument("--llama-server", help="llama-server binary")
    p.add_argument("--gguf", action="append", default=[], metavar="PRECISION=FILE", help="llama.cpp's file per precision")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--output", default=None)
    return p.parse_args()


def lmrt_run(gen, ids: list[int], new_tokens: int, speculation: str) -> dict:
    before = (gen.stats.proposed_tokens, gen.stats.accepted_tokens)
    began = time.perf_counter()
    tokens = gen.iter_tokens(ids, gen.config(max_new_tokens=new_tokens, temperature=0.0, speculation=speculation))
    first = next(tokens)
    got_first = time.perf_counter()
    out = [first, *tokens]
    end = time.perf_counter()
    return {
        "tokens": out,
        "decode_tokens_per_s": (len(out) - 1) / (end - got_first) if len(out) > 1 else float("nan"),
        "ttft_s": got_first - began,
        "proposed": gen.stats.proposed_tokens - before[0],
        "accepted": gen.stats.accepted_tokens - before[1],
    }


class LlamaServer:
    def __init__(self, binary: str, gguf: str, threads: int):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port), "-np", "1", "-c", "4096",
             "-t", str(threads), "-tb", str(threads), "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if self._request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("llama-server did not start")

    def _request(self, method: str, path: str, body: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request(method, path, body=json.dumps(body) if body else None, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data

    def run(self, ids: list[int], new_tokens: int) -> dict:
        body = {"prompt": ids, "n_predict": new_tokens, "temperature": 0, "top_k": 1, "cache_prompt": False}
        status, data = self._request("POST", "/completion", body)
        if status != 200:
            raise RuntimeError(f"llama-server: HTTP {status}")
        t = json.loads(data)["timings"]
        return {"decode_tokens_per_s": (t["predicted_n"] - 1) / (t["predicted_ms"] / 1e3) if t["predicted_n"] > 1 else float("nan"),
                "tokens_n": t["predicted_n"]}  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def main() -> None:
    args = parse_args()
    from lmrt.runtime import Generator

    lmrt = dict(e.split("=", 1) for e in args.lmrt)
    ggufs = dict(e.split("=", 1) for e in args.gguf)
    if not lmrt:
        sys.exit("give at least one lmrt model directory (--lmrt int8=DIR)")
    sets = {"grounded": grounded_prompts(), "open-ended": OPEN_ENDED}
    results: dict = {}
    for precision, model_dir in lmrt.items():
        gen = Generator(model_dir, threads=args.threads)
        inexact = gen.manifest.quantization.get("compute") == "int8" and not gen.manifest.graph.io.scratch_positions
        mode = "on" if inexact else "auto"
        prompts = {kind: [(name, gen.chat_prompt([{"role": "user", "content": text}])) for name, text in items]
                   for kind, items in sets.items()}  # fmt: skip
        for kind, items in prompts.items():
            lengths = [len(ids) for _, ids in items]
            print(f"{precision} {kind}: prompts of {min(lengths)} to {max(lengths)} tokens", file=sys.stderr, flush=True)
        server = LlamaServer(args.llama_server, ggufs[precision], args.threads) if args.llama_server and precision in ggufs else None
        try:
            lmrt_run(gen, prompts["open-ended"][0][1], 8, "off")  # warm-up
            for run in range(args.runs):
                for kind, items in prompts.items():
                    for name, ids in items:
                        print(f"run {run + 1}/{args.runs} {precision} {kind} {name}", file=sys.stderr, flush=True)
                        on = lmrt_run(gen, ids, args.new_tokens, mode)
                        off = lmrt_run(gen, ids, args.new_tokens, "off")
                        if on["tokens"] != off["tokens"] and mode == "auto":
                            raise SystemExit(f"{precision} {name}: speculation under auto changed the greedy output")
                        entry = results.setdefault((precision, kind, name), {"on": [], "off": [], "llama": [], "tokens": len(on["tokens"]),
                                                                             "proposed": 0, "accepted": 0, "same": True, "mode": mode})  # fmt: skip
                        entry["same"] = entry["same"] and on["tokens"] == off["tokens"]
                        entry["on"].append(on["decode_tokens_per_s"])
                        entry["off"].append(off["decode_tokens_per_s"])
                        entry["proposed"] += on["proposed"]
                        entry["accepted"] += on["accepted"]
                        if server:
                            entry["llama"].append(server.run(ids, args.new_tokens)["decode_tokens_per_s"])
        finally:
            if server:
                server.stop()
    markdown = report(results, args, sets)
    write_section("speculation", markdown, *([args.output] if args.output else []))
    print(markdown)


def report(results: dict, args, sets) -> str:
    lines = [
        "## One stream: prompt-lookup speculation",
        "",
        f"SmolLM2-135M-Instruct, greedy, up to {args.new_tokens} new tokens after a chat-formatted prompt; decode "
        f"tokens/s after the first token, median of {args.runs} interleaved runs; lmrt with speculation and without "
        "(off). Speculation is the default (auto), which must give the same tokens (the script stops if not); an "
        "int8-compute model exported without the scratch attention row speculates only when asked (on), and 'same' "
        "says whether its tokens matched on every run. llama.cpp is llama-server, one slot, the same "
        "token ids, timed by its own report. Acceptance: share of proposed tokens the model agreed with. Written by "
        "`benchmarks/speculation.py`.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
    ]
    for precision in sorted({p for p, _, _ in results}):
        lines += ["", f"### {precision}", "",
                  "| prompt | kind | tokens | acceptance | same | lmrt, speculation | lmrt, off | speed-up | llama.cpp | ÷ llama.cpp |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        summary: dict[str, list] = {}
        ended: list[str] = []
        for (p, kind, name), e in results.items():
            if p != precision:
                continue
            if e["tokens"] < 2:  # no decode step to time
                ended.append(name)
                continue
            on, off = statistics.median(e["on"]), statistics.median(e["off"])
            llama = statistics.median(e["llama"]) if e["llama"] else None
            acc = f"{e['accepted'] / e['proposed']:.0%}" if e["proposed"] else "–"
            lines.append(
                f"| {name} | {kind} | {e['tokens']} | {acc} | {'yes' if e['same'] else 'no'} | {on:.1f} | {off:.1f} | {on / off:.2f}× | "
                + (f"{llama:.1f} | {on / llama:.2f}× |" if llama else "– | – |")
            )
            summary.setdefault(kind, []).append((on / off, on / llama if llama else None))
        if ended:
            lines += ["", f"Left out: {', '.join(ended)} (the model ended its answer at the first token, so there is no decode rate)."]
        for kind, pairs in summary.items():
            speedups = [a for a, _ in pairs]
            vs = [b for _, b in pairs if b is not None]
            lines.append("")
            lines.append(
                f"- {kind}: speculation vs off, median {statistics.median(speedups):.2f}× (from {min(speedups):.2f}× to "
                f"{max(speedups):.2f}×)" + (f"; vs llama.cpp median {statistics.median(vs):.2f}×" if vs else "")
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
