"""``/metrics`` in Prometheus' text format. Figures that llama-server also reports keep its names, so
dashboards made for it work unchanged; the others are lmrt's own."""

from __future__ import annotations

from ..runtime import EngineStatus


def render(s: EngineStatus) -> str:
    text = _text(rows(s))
    per_adapter = sorted(s.stats.adapter_requests.items())  # LoRA adapters: names of letters, digits, . _ -
    if not per_adapter:
        return text
    name = "lmrt:adapter_requests_total"
    lines = [f"# HELP {name} Requests finished per LoRA adapter.", f"# TYPE {name} counter"]
    return text + "\n".join(lines + [f'{name}{{adapter="{a}"}} {n}' for a, n in per_adapter]) + "\n"


def rows(s: EngineStatus) -> list[tuple[str, str, str, float | int]]:
    """(name, kind, help, value) of every figure of an engine's /metrics."""
    st = s.stats
    return [
        ("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.", st.prompt_tokens),
        ("llamacpp:prompt_seconds_total", "counter", "Prompt process time", st.prompt_seconds),
        ("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed.", st.generated_tokens),
        ("llamacpp:tokens_predicted_seconds_total", "counter", "Predict process time", st.decode_seconds),
        ("llamacpp:n_decode_total", "counter", "Total number of decode steps.", st.decode_steps),
        ("llamacpp:n_busy_slots_per_decode", "gauge", "Average number of busy slots per decode step.",
         st.decoded_rows / st.decode_steps if st.decode_steps else 0.0),
        ("llamacpp:prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
         st.prompt_tokens / st.prompt_seconds if st.prompt_seconds else 0.0),
        ("llamacpp:predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
         st.generated_tokens / st.decode_seconds if st.decode_seconds else 0.0),
        ("llamacpp:kv_cache_tokens", "gauge", "KV-cache positions held, free slots' reusable prefixes included.",
         s.cached_positions),
        ("llamacpp:kv_cache_usage_ratio", "gauge", "KV-cache usage. 1 means 100 percent usage.",
         s.cached_positions / (s.slots * s.ctx_size)),
        ("llamacpp:requests_processing", "gauge", "Number of requests processing.", s.requests_processing),
        ("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", s.requests_waiting),
        ("lmrt:kv_slots_total", "gauge", "Cache rows (slots) reserved at start.", s.slots),
        ("lmrt:kv_slots_in_use", "gauge", "Slots held by a request being read or generated.", s.slots_in_use),
        ("lmrt:kv_cache_bytes", "gauge", "Bytes of decoding state (KV cache, recurrent state and its snapshots) reserved at start.",
         s.state_bytes),
        ("lmrt:prompt_tokens_cached_total", "counter", "Prompt tokens found in a slot's cache instead of computed.",
         st.cached_prompt_tokens),
        ("lmrt:requests_finished_total", "counter", "Requests finished, cancelled or failed.", st.requests_finished),
    ]  # fmt: skip


def render_encoder(requests: int, tokens: int) -> str:
    """The figures of a server of an embedding model."""
    return _text([
        ("lmrt:embedding_requests_total", "counter", "Embedding requests answered.", requests),
        ("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.", tokens),
    ])  # fmt: skip


def _text(rows: list[tuple[str, str, str, float | int]]) -> str:
    out = []
    for name, kind, help_text, value in rows:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"]
    return "\n".join(out) + "\n"
