"""One measurement of one system, in a process of its own; ``side_by_side.py`` runs it.

    python bench_worker.py SYSTEM MODEL PROMPT_IDS_JSON NEW_TOKENS

SYSTEM is lmrt, genai, optimum, transformers or llamacpp; MODEL the path that system loads. The same
prompt token ids go to every system, and each must produce exactly NEW_TOKENS greedy tokens (end of
text is not allowed to stop it early). After loading and one short warm-up, it prints one JSON line:
time to first token (prompt processing plus the first token), decode tokens/s over the tokens after the
first, peak resident memory of the process, the first tokens (to check that systems agree) and the
versions involved. Only the system's own packages are imported, so it runs in that system's
environment.
"""

from __future__ import annotations

import json
import resource
import sys
import time

WARMUP = [1, 2, 3, 4, 5, 6, 7, 8]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux


def timed(tokens) -> tuple[float, float, list[int]]:
    """Consume a token iterator: (seconds to the first token, seconds for the rest, tokens)."""
    start = time.perf_counter()
    out = [next(tokens)]
    first = time.perf_counter()
    out.extend(tokens)
    return first - start, time.perf_counter() - first, out


def run_lmrt(model, ids, n):
    import onnxruntime

    from lmrt import __version__, runtime

    gen = runtime.Generator(model, provider="cpu")

    def tokens(prompt, count):
        config = gen.config(max_new_tokens=count, stop_token_ids=[], temperature=0.0, speculation="off")
        return gen.iter_tokens(prompt, config)  # speculation off: the same work per token as the others

    timed(tokens(WARMUP, 4))
    return timed(tokens(ids, n)), {"lmrt": __version__, "onnxruntime": onnxruntime.__version__}


def run_genai(model, ids, n):
    import onnxruntime_genai as og

    m = og.Model(model)

    def tokens(prompt, count):
        params = og.GeneratorParams(m)
        # max_length sizes genai's cache; min_length keeps end of text from stopping it early
        params.set_search_options(do_sample=False, max_length=len(prompt) + count, min_length=len(prompt) + count)
        g = og.Generator(m, params)
        g.append_tokens(prompt)
        for _ in range(count):
            g.generate_next_token()
            yield int(g.get_next_tokens()[0])

    from importlib.metadata import version

    timed(tokens(WARMUP, 4))
    return timed(tokens(ids, n)), {"onnxruntime-genai": og.__version__, "onnxruntime": version("onnxruntime")}


def _hf_generate(model_obj, ids, n, torch):
    """transformers' generate, timed through a streamer: first token, then the rest."""
    from transformers.generation.streamers import BaseStreamer

    stamps: list[float] = []

    class Clock(BaseStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    prompt = torch.tensor([ids])
    start = time.perf_counter()
    out = model_obj.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        streamer=Clock(), pad_token_id=0,
    )  # fmt: skip
    # the streamer sees the prompt first, then one call per new token
    return stamps[1] - start, stamps[-1] - stamps[1], out[0, len(ids) :].tolist()


def run_optimum(model, ids, n):
    from importlib.metadata import version

    import onnxruntime
    import optimum.onnxruntime as oo
    import torch
    import transformers

    m = oo.ORTModelForCausalLM.from_pretrained(model, provider="CPUExecutionProvider")
    _hf_generate(m, WARMUP, 4, torch)
    versions = {
        "optimum-onnx": version("optimum-onnx"), "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__,
    }  # fmt: skip
    return _hf_generate(m, ids, n, torch), versions


def run_transformers(model, ids, n):
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.inference_mode():
        _hf_generate(m, WARMUP, 4, torch)
        result = _hf_generate(m, ids, n, torch)
    return result, {"transformers": transformers.__version__, "torch": torch.__version__}


def run_llamacpp(model, ids, n):
    import os

    import llama_cpp

    threads = len(os.sched_getaffinity(0))
    llm = llama_cpp.Llama(model_path=model, n_ctx=len(ids) + n + 16, n_batch=512, n_threads=threads, verbose=False)

    def tokens(prompt, count):
        llm.reset()
        it = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        for _ in range(count):
            yield int(next(it))

    timed(tokens(WARMUP, 4))
    return timed(tokens(ids, n)), {"llama-cpp-python": llama_cpp.__version__}


RUNNERS = {
    "lmrt": run_lmrt,
    "genai": run_genai,
    "optimum": run_optimum,
    "transformers": run_transformers,
    "llamacpp": run_llamacpp,
}


def main() -> None:
    system, model, ids_file, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(ids_file) as f:
        ids = json.load(f)
    (first, rest, tokens), versions = RUNNERS[system](model, ids, n)
    print(
        json.dumps(
            {
                "ttft_s": first,
                "decode_tokens_per_s": (len(tokens) - 1) / rest,
                "new_tokens": len(tokens),
                "peak_rss_mb": peak_rss_mb(),
                "first_tokens": tokens[:16],
                "versions": versions,
            }
        )
    )


if __name__ == "__main__":
    main()
