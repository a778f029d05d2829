"""Aggregate throughput of ``lmrt serve --ray`` with 1 and 2 replicas (and plain ``lmrt serve`` as
the baseline without Ray); writes the "ray-scale" section of docs/benchmarks.md.

Each configuration is started in turn on 127.0.0.1 (``--ray`` starts its own local Ray cluster),
warmed up, and then N openai clients each send R non-streamed completions one after another: the
same prompt and exactly T new tokens (end-of-sequence ignored). Reported: aggregate generated
tokens/s over the run and the request latency p50/p95, and how the requests were spread over the
replicas (the ``x-lmrt-replica`` header).

The replicas share this machine's cores, so the configurations give the engine the same CPUs in
total: one replica with all threads, or two replicas with half each.

Not part of the test suite; needs the ``ray`` extra:

    python benchmarks/ray_scale.py models/smol-int8 --clients 8 --requests 4 --new-tokens 64
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import openai

from report import machine, write_section

PROMPT = "The history of the printing press begins in the fifteenth century, when movable metal type made books"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests each client makes, one after another")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="times each configuration is measured, in turn")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads in total, split over the replicas")
    p.add_argument("--output", default=None, help="markdown file to write the section into (default docs/benchmarks.md)")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``lmrt serve`` (with ``--ray`` and a replica count, or without) until its ready line."""

    def __init__(self, model_dir: str, replicas: int | None, threads: int, slots: int):
        self.port = free_port()
        argv = [sys.executable, "-m", "lmrt", "serve", model_dir, "--port", str(self.port), "--threads", str(threads),
                "--slots", str(slots), "--ctx-size", "512"]  # fmt: skip
        if replicas is not None:
            argv += ["--ray", "--replicas", str(replicas)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        ready = threading.Event()
        self.lines: list[str] = []

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if line.startswith("lmrt serve: http://"):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or not any(line.startswith("lmrt serve: http://") for line in self.lines):
            self.stop()
            raise RuntimeError("the server did not start: " + "".join(self.lines[-10:]))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def one(client: openai.OpenAI, model: str, new_tokens: int) -> tuple[int, float, str]:
    """(generated tokens, seconds, replica) of one completion."""
    start = time.perf_counter()
    raw = client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=new_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    out = raw.parse()
    return out.usage.completion_tokens, time.perf_counter() - start, raw.headers.get("x-lmrt-replica", "-")


def load(server: Server, model: str, clients: int, requests: int, new_tokens: int) -> dict:
    client = server.client()
    for _ in range(2):  # warm-up: every replica's first requests
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda _: one(client, model, 8), range(clients)))
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda _: [one(client, model, new_tokens) for _ in range(requests)], range(clients)))
    wall = time.perf_counter() - start
    results = [r for run in runs for r in run]
    latencies = sorted(seconds for _, seconds, _ in results)
    spread = collections.Counter(replica for _, _, replica in results)
    return {
        "tokens_per_s": sum(tokens for tokens, _, _ in results) / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "spread": "-" if "-" in spread else "/".join(str(n) for n in sorted(spread.values(), reverse=True)),
    }


def main() -> None:
    args = parse_args()
    model = os.path.basename(os.path.abspath(args.model_dir).rstrip(os.sep))
    half = max(1, args.cores // 2)
    configurations = [
        ("lmrt serve (no Ray)", None, args.cores, args.clients),
        (f"--ray, 1 replica x {args.cores} threads", 1, args.cores, args.clients),
        (f"--ray, 2 replicas x {half} thread{'s' if half > 1 else ''}", 2, half, max(1, args.clients // 2)),
    ]
    measured: dict[str, list[dict]] = collections.defaultdict(list)
    for _ in range(args.rounds):  # configurations in turn, so a busy spell on the machine hits them all
        for label, replicas, threads, slots in configurations:
            server = Server(args.model_dir, replicas, threads, slots)
            try:
                got = load(server, model, args.clients, args.requests, args.new_tokens)
            finally:
                server.stop()
            print(label, got, file=sys.stderr)
            measured[label].append(got)
    lines = [
        "## Scaling out on Ray Serve",
        "",
        f"{date.today().isoformat()}, {machine()}. Model {model}; {args.clients} openai clients, each sending "
        f"{args.requests} non-streamed completions one after another, exactly {args.new_tokens} new tokens each "
        "(end-of-sequence ignored). `--ray` started its own local Ray cluster on this machine. "
        "Replicas share the machine's cores: 1 replica gets all threads, 2 replicas half each. "
        f"Each configuration measured {args.rounds} times, the configurations in turn; every round is shown. "
        "On one machine, replicas only split its cores and every request takes one more hop (Ray's proxy), so "
        "this measures what Ray costs; replicas add throughput when they run on machines of their own. "
        "Written by `benchmarks/ray_scale.py`.",
        "",
        "| configuration | slots per replica | tokens/s (aggregate), each round | latency p50 (s) | latency p95 (s) | requests per replica |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, _, slots in configurations:
        runs = measured[label]
        rates = " / ".join(f"{g['tokens_per_s']:.1f}" for g in runs)
        p50 = " / ".join(f"{g['p50']:.2f}" for g in runs)
        p95 = " / ".join(f"{g['p95']:.2f}" for g in runs)
        lines.append(f"| {label} | {slots} | {rates} | {p50} | {p95} | {' ; '.join(g['spread'] for g in runs)} |")
    write_section("ray-scale", "\n".join(lines), *([args.output] if args.output else []))


if __name__ == "__main__":
    main()
