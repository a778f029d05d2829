"""Many streaming clients against lmrt serve and llama.cpp's servers, side by side; writes the
"serving" section of docs/benchmarks.md.

Each system is started in turn on 127.0.0.1 with as many slots as clients, warmed up, and then N
clients each stream R requests one after another: the same ~P-token prompt (the same text for every
system) and exactly T new tokens (end-of-sequence ignored). Reported per system and client count:
aggregate generated tokens/s over the run, time to first token p50/p95 and the gaps between streamed
tokens p50/p95. Besides the load table:

  - one client against ``lmrt bench`` on the same model (the server's overhead on one stream);
  - the second turn of a chat with a long history, with and without the first turn's cache;
  - the gaps between tokens of running streams while a long prompt arrives (chunked prefill).

Not part of the test suite; needs the ``serve`` extra. llama.cpp's servers are optional:

    python benchmarks/serve_load.py --lmrt int8=models/smol-int8 --lmrt int4=models/smol-int4 \\
        --llama-server int8=build/bin/llama-server:smol-q8_0.gguf \\
        --llama-server int4=build/bin/llama-server:smol-q4_1.gguf \\
        --llama-cpp-python int8=llama-venv/bin/python:smol-q8_0.gguf
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from typing import Callable

from report import machine, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROSE = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made books "
    "cheaper to copy than by hand. Within fifty years presses were working in more than two hundred towns, "
    "and the number of books in Europe grew from thousands to millions. Printers became publishers, scholars "
    "corrected texts against many copies, and readers far from the universities could own what only monasteries "
    "had kept before. "
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lmrt", action="append", default=[], metavar="PRECISION=DIR")
    p.add_argument("--llama-server", action="append", default=[], metavar="PRECISION=BINARY:GGUF")
    p.add_argument("--llama-cpp-python", action="append", default=[], metavar="PRECISION=PYTHON:GGUF")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=2, help="requests each client makes, one after another")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ctx-size", type=int, default=1024, help="tokens per slot")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--history-tokens", type=int, default=1000, help="chat history for the prefix-reuse measurement")
    p.add_argument("--long-prompt", type=int, default=2000, help="prompt that arrives while streams run")
    p.add_argument("--speculation", choices=("auto", "on", "off"), default="off",
                   help="lmrt's speculation for every request (default off: the prompt is repeated prose, which "
                   "prompt lookup predicts; benchmarks/speculation.py measures that)")
    p.add_argument("--output", default=None, help="markdown file to write the section into (default docs/benchmarks.md)")
    return p.parse_args()


# --- servers ---------------------------------------------------------------------------------


class Running:
    """A server process on 127.0.0.1:port."""

    def __init__(self, argv: list[str], port: int, env: dict | None = None):
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {self.proc.returncode}")
            try:
                status, _ = request("GET", port, "/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{argv[0]} did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(system: str, spec: str, slots: int, args, ctx: int, extra: list[str] = ()) -> Running:
    """``system`` serving ``spec`` (a model directory, or BINARY:GGUF) with ``slots`` slots of ``ctx``
    tokens on ``args.threads`` threads; ``extra``: more of its command line."""
    port = free_port()
    if system == "lmrt":
        argv = [sys.executable, "-m", "lmrt", "serve", spec, "--port", str(port), "--slots", str(slots),
                "--ctx-size", str(ctx), "--threads", str(args.threads), "--max-queue", "1000", *extra]  # fmt: skip
        return Running(argv, port)
    binary, _, gguf = spec.partition(":")
    if system == "llama-server":
        argv = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c", str(ctx * slots),
                "-t", str(args.threads), "-tb", str(args.threads), "--cont-batching", "--no-webui", *extra]  # fmt: skip
        return Running(argv, port)
    argv = [binary, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(ctx), "--n_threads", str(args.threads)]  # fmt: skip
    return Running(argv, port)


# --- clients ---------------------------------------------------------------------------------


def request(method: str, port: int, path: str, body: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, body=json.dumps(body) if body else None, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def stream(port: int, body: dict) -> dict:
    """One streamed completion: arrival times of the chunks that carry text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    began = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    times = []
    for line in r:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if any(c.get("text") for c in chunk.get("choices", [])):
            times.append(time.perf_counter())
    conn.close()
    return {"began": began, "times": times}


def body_for(model: str, prompt: str, new_tokens: int, args) -> dict:
    """A greedy completion of exactly ``new_tokens``; lmrt reads ``speculation``, llama.cpp ignores it."""
    return {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "speculation": args.speculation}


def load_run(port: int, body: Callable[[int, int], dict], clients: int, requests: int) -> dict:
    """``clients`` clients at once, each streaming ``requests`` completions one after another, the
    r-th of client i asking ``body(i, r)``."""
    results: list[dict] = []
    errors: list[str] = []

    def client(i: int):
        for r in range(requests):
            try:
                results.append(stream(port, body(i, r)))
            except Exception as e:  # noqa: BLE001 - reported in the table
                errors.append(str(e))

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    tokens = sum(len(r["times"]) for r in results)
    ttft = sorted(r["times"][0] - r["began"] for r in results if r["times"])
    gaps = sorted(b - a for r in results for a, b in zip(r["times"], r["times"][1:]))
    return {
        "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
        "itl_p50": pct(gaps, 50), "itl_p95": pct(gaps, 95), "errors": len(errors), "chunks": tokens,
    }  # fmt: skip


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def text_of(model_dir: str, n: int) -> str:
    """About ``n`` tokens of prose (counted with the lmrt model's tokenizer)."""
    from lmrt.runtime import Generator

    gen = Generator(model_dir)
    ids = gen.encode(PROSE * (n // 40 + 2), add_special_tokens=False)[:n]
    return gen.decode(ids)


# --- the extra measurements of lmrt ----------------------------------------------------------


def one_stream_vs_bench(model_dir: str, args) -> dict:
    """One client's decode speed against ``lmrt bench``'s, interleaved (the server idles while
    bench runs), medians of 3."""
    server = start("lmrt", model_dir, 1, args, args.ctx_size)
    try:
        prompt = text_of(model_dir, args.prompt_tokens)
        name = os.path.basename(os.path.abspath(model_dir))
        stream(server.port, body_for(name, prompt, 16, args))
        rates, benches = [], []
        for _ in range(3):
            done = subprocess.run(
                [sys.executable, "-m", "lmrt", "bench", model_dir, "--prompt-tokens", str(args.prompt_tokens),
                 "--new-tokens", str(args.new_tokens), "--runs", "1", "--threads", str(args.threads),
                 "--speculation", args.speculation, "--json"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            benches.append(json.loads(done.stdout)["decode_tokens_per_s"])
            r = stream(server.port, body_for(name, prompt, args.new_tokens, args))
            rates.append((len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]))
    finally:
        server.stop()
    return {"bench": statistics.median(benches), "server": statistics.median(rates)}


def chat_reuse(model_dir: str, args) -> dict:
    """TTFT of a chat's second turn (about ``history_tokens`` of history) with and without reuse."""
    name = os.path.basename(os.path.abspath(model_dir))
    history = [{"role": "user", "content": text_of(model_dir, args.history_tokens) + " Summarize this."}]

    def ttft(port: int, messages: list[dict]) -> tuple[float, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        began = time.perf_counter()
        body = {"model": name, "messages": messages, "max_tokens": 32, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        first, text = None, ""
        for line in r:
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    first = first or time.perf_counter() - began
                    text += delta
        conn.close()
        return first, text

    out = {}
    for reuse in (True, False):
        server = start("lmrt", model_dir, 2, args, max(args.ctx_size, args.history_tokens + 256))
        try:
            _, answer = ttft(server.port, history)
            second = history + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Shorter, please."}]
            if not reuse:  # a fresh server: nothing cached
                server.stop()
                server = start("lmrt", model_dir, 2, args, max(args.ctx_size, args.history_tokens + 256))
            out["with" if reuse else "without"] = ttft(server.port, second)[0]
        finally:
            server.stop()
    return out


def long_prompt_arrives(model_dir: str, args, chunk: int) -> dict:
    """Gaps between the tokens of 4 running streams while a long prompt is read, in chunks of ``chunk``."""
    name = os.path.basename(os.path.abspath(model_dir))
    ctx = max(args.ctx_size, args.long_prompt + 64)
    port = free_port()
    argv = [sys.executable, "-m", "lmrt", "serve", model_dir, "--port", str(port), "--slots", "5", "--ctx-size", str(ctx),
            "--threads", str(args.threads), "--prefill-chunk", str(chunk)]  # fmt: skip
    server = Running(argv, port)
    try:
        short = text_of(model_dir, 64)
        long = text_of(model_dir, args.long_prompt)
        streams: list[dict] = []
        threads = [threading.Thread(target=lambda: streams.append(stream(port, body_for(name, short, 200, args)))) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        arrived = time.perf_counter()
        big = stream(port, body_for(name, long, 1, args))
        read_until = big["times"][0] if big["times"] else time.perf_counter()
        for t in threads:
            t.join()
        gaps = sorted(b - a for s in streams for a, b in zip(s["times"], s["times"][1:]) if arrived <= b <= read_until)
        before = sorted(b - a for s in streams for a, b in zip(s["times"], s["times"][1:]) if b < arrived)
    finally:
        server.stop()
    return {"chunk": chunk, "prefill_s": read_until - arrived, "gap_p50": pct(gaps, 50), "gap_max": max(gaps or [float("nan")]),
            "gap_before_p50": pct(before, 50)}  # fmt: skip


# --- the report ------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    systems = [("lmrt", *e.split("=", 1)) for e in args.lmrt]
    systems += [("llama-server", *e.split("=", 1)) for e in args.llama_server]
    systems += [("llama-cpp-python", *e.split("=", 1)) for e in args.llama_cpp_python]
    lmrt_dirs = [spec for system, _, spec in systems if system == "lmrt"]
    if not lmrt_dirs:
        sys.exit("give at least one lmrt model directory (--lmrt int8=DIR)")
    prompt = text_of(lmrt_dirs[0], args.prompt_tokens)
    table = {}
    for clients in args.clients:
        for system, precision, spec in systems:
            print(f"{clients} clients: {system} {precision}", file=sys.stderr, flush=True)
            server = start(system, spec, clients, args, args.ctx_size)
            try:
                model = os.path.basename(os.path.abspath(spec)) if system == "lmrt" else "model"
                stream(server.port, body_for(model, prompt, 8, args))  # warm-up
                body = lambda i, r: body_for(model, prompt, args.new_tokens, args)  # noqa: E731
                table[(system, precision, clients)] = load_run(server.port, body, clients, args.requests)
            finally:
                server.stop()
    extras = {}
    for precision, model_dir in [(p, s) for system, p, s in systems if system == "lmrt"]:
        print(f"lmrt {precision}: one stream, chat reuse, long prompt", file=sys.stderr, flush=True)
        extras[precision] = {
            "one": one_stream_vs_bench(model_dir, args),
            "reuse": chat_reuse(model_dir, args),
            "long": [long_prompt_arrives(model_dir, args, c) for c in (256, 64)],
        }
    markdown = report(table, extras, systems, args)
    write_section("serving", markdown, *([args.output] if args.output else []))
    print(markdown)


def report(table: dict, extras: dict, systems, args) -> str:
    lines = [
        "## Serving: many streaming clients",
        "",
        f"Each client streams {args.requests} completions one after another: a {args.prompt_tokens}-token prompt and "
        f"exactly {args.new_tokens} new tokens (greedy, end-of-sequence ignored). Each server has as many slots as "
        f"clients, {args.ctx_size} tokens each, {args.threads} threads; lmrt's speculation {args.speculation}. Aggregate tokens/s counts every streamed "
        "token over the whole run; the gaps are between consecutive streamed tokens of one request. Written by "
        "`benchmarks/serve_load.py`.",
        "",
        f"Machine: {machine()}. Measured {date.today().isoformat()}.",
        "",
        "| system | clients | aggregate tokens/s | time to first token p50 / p95 (ms) | gap between tokens p50 / p95 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (system, precision, clients), r in table.items():
        lines.append(
            f"| {system} {precision} | {clients} | {r['tokens_per_s']:.1f} | {r['ttft_p50'] * 1e3:.0f} / {r['ttft_p95'] * 1e3:.0f} | "
            f"{r['itl_p50'] * 1e3:.1f} / {r['itl_p95'] * 1e3:.1f} | {r['errors']} |"
        )
    lines += ["", "Ratios at the same precision (lmrt ÷ llama-server):", ""]
    for (system, precision, clients), r in table.items():
        theirs = table.get(("llama-server", precision, clients))
        if system == "lmrt" and theirs:
            lines.append(
                f"- {precision}, {clients} client{'s' if clients > 1 else ''}: throughput {r['tokens_per_s'] / theirs['tokens_per_s']:.2f}×, "
                f"gap p95 {r['itl_p95'] * 1e3:.1f} ms vs {theirs['itl_p95'] * 1e3:.1f} ms"
            )
    for precision, e in extras.items():
        one, reuse = e["one"], e["reuse"]
        lines += [
            "",
            f"lmrt {precision}:",
            "",
            f"- one client streams at {one['server']:.1f} tokens/s; `lmrt bench` decodes at {one['bench']:.1f}, "
            "interleaved, medians of 3 "
            f"({one['server'] / one['bench']:.1%}).",
            f"- second chat turn after a {args.history_tokens}-token history: first token after "
            f"{reuse['with'] * 1e3:.0f} ms with the first turn's cache, {reuse['without'] * 1e3:.0f} ms without "
            f"({reuse['with'] / reuse['without']:.0%}).",
        ]
        for long in e["long"]:
            lines.append(
                f"- a {args.long_prompt}-token prompt read in chunks of {long['chunk']} while 4 streams run: read in "
                f"{long['prefill_s']:.2f} s; the streams' gaps meanwhile p50 {long['gap_p50'] * 1e3:.0f} ms, "
                f"max {long['gap_max'] * 1e3:.0f} ms (before it arrived: p50 {long['gap_before_p50'] * 1e3:.0f} ms)."
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
