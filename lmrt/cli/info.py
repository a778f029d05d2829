"""``lmrt info`` (what a model directory holds) and ``lmrt doctor`` (what this machine offers)."""

from __future__ import annotations

import click

from .errors import errors_to_one_line


@click.command("info")
@click.argument("model_dir", type=click.Path())
@errors_to_one_line
def info(model_dir: str) -> None:
    """Summarize the model in MODEL_DIR and list the execution providers available here.

    \b
    Example:
      lmrt info models/smollm2
    """
    from ..atomic import directory_size
    from ..precision import weights_row
    from ..runtime import load_manifest
    from ..runtime.session import available_providers

    m = load_manifest(model_dir)
    if m.task != "generate":
        from ..encoder_output import encoder_rows

        print_rows(encoder_rows(m, directory_size(model_dir)) + [onnxruntime_row(m), ("providers", ", ".join(available_providers()) or "none")])
        return
    a, t, p, v = m.architecture, m.tokenizer, m.provenance, m.validation
    size = directory_size(model_dir)
    rows = [
        ("model", f"{a.model_type} ({a.family} family)" + (f", {a.num_layers} layers, hidden {a.hidden_size}" if a.num_layers else "")),
        state_row(m),
        ("vocabulary", str(a.vocab_size)),
        ("context", f"{a.context_length} tokens"),
        ("weights", weights_row(m, size)),
        ("eos ids", ", ".join(map(str, t.eos_token_ids)) or "none"),
        ("chat template", "yes" if t.chat_template else "no"),
        ("defaults", ", ".join(f"{k}={val}" for k, val in m.generation_defaults.items()) or "none"),
        ("source", f"{p.get('source', '?')} ({p.get('source_kind', '?')}), lmrt {p.get('lmrt_version', '?')}"),
    ]

    def validation() -> str:
        return (
            f"max |Δlogit| {v['max_abs_diff']:.2e} (relative {v['max_rel_diff']:.2e}), "
            f"greedy agreement {v['greedy_agreement']:.1%}, {'passed' if v.get('passed') else 'FAILED'}"
        )

    def quantization() -> str:
        kept = ", ".join(f"{n} {k}" for k, n in q.get("gguf_blocks_kept", {}).items())
        return (
            f"{q['name']}: {q['bits']}-bit {q['method']} blocks of {q['block_size']}, lm_head/embeddings "
            f"{q['head_bits']}-bit, compute {q.get('compute', 'int8')}" + (f"; kept from GGUF: {kept}" if kept else "")
        )

    def quality() -> str:
        return (
            f"perplexity {g['perplexity']:.3f} vs fp32 {g['perplexity_reference']:.3f} ({g['increase']:+.2%}, "
            f"allowed +{g['max_increase']:.0%}), top-1 agreement {g['top1_agreement']:.1%}"
            + (" (kept with --allow-degraded)" if g.get("allowed_degraded") else "")
        )

    q, g = m.quantization, m.quality
    for name, record, describe in (("validation", v, validation), ("quantization", q, quantization), ("quality", g, quality)):
        if record:
            try:
                rows.append((name, describe()))
            except (KeyError, TypeError, ValueError, AttributeError):  # a hand-edited record: show the rest
                rows.append((name, "unreadable in lmrt.json"))
    if m.lora is not None:  # LoRA adapters, each a model id of its own under lmrt serve
        rows.append(("adapters", ", ".join(adapter_words(a) for a in m.lora.adapters)))
    rows.append(onnxruntime_row(m))
    rows.append(("providers", ", ".join(available_providers()) or "none"))
    print_rows(rows)


def adapter_words(a) -> str:
    """One adapter in words: rank, modules, and the perplexity recorded when it was added."""
    q = a.quality
    measured = f"; perplexity {q['perplexity']:.2f}, base {q['base_perplexity']:.2f} on {q['eval_text']}" if q else ""
    return f"{a.name} (rank {a.rank}, {len(a.targets)} modules{measured})"


def state_row(m) -> tuple[str, str]:
    """What a step keeps and what it takes: the KV cache's attention, a declared state (a recurrent
    model's h and c per layer), or nothing (a window graph, re-run each step)."""
    from ..runtime.state_spec import state_of
    from ..state_size import per_sequence

    a = m.architecture
    if m.graph.decoding == "window":
        return ("decoding", f"no state: each step runs the sequence again, up to its window of {a.context_length} tokens (slower than a cache)")
    size = per_sequence(state_of(m))
    if not m.graph.state:
        return ("attention", f"{a.num_heads} heads, {a.num_kv_heads} KV heads, head size {a.head_size}; KV cache {size}")
    tensors = ", ".join(f"{s.past.removeprefix('past_state.')} {s.kind} {list(s.shape)}" for s in m.graph.state)
    note = "; carried step by step, going back from snapshots" if any(s.kind == "fixed" for s in m.graph.state) else ""
    if m.graph.decoding == "declared":
        note += "; the module's own state, rows of one length run together"
    return ("state", f"{tensors} per sequence: {size}{note}")


def installed_onnxruntime_version() -> str | None:
    try:
        from ..runtime.compat import installed_onnxruntime

        return installed_onnxruntime()
    except ImportError:
        return None


def onnxruntime_row(m) -> tuple[str, str]:
    from ..doctor import onnxruntime_needed

    return ("requires", onnxruntime_needed(m, installed_onnxruntime_version()))


@click.command("doctor")
@click.argument("model_dir", type=click.Path(), required=False)
@errors_to_one_line
def doctor(model_dir: str | None) -> None:
    """What this machine offers (Python, onnxruntime, providers, CPU features, export profiles) and,
    with MODEL_DIR, what the model needs and whether this machine meets it.

    \b
    Example:
      lmrt doctor models/smollm2
    """
    from ..doctor import machine_rows, model_rows

    rows = machine_rows()
    if model_dir is not None:
        from ..runtime import load_manifest

        rows += model_rows(model_dir, load_manifest(model_dir), installed_onnxruntime_version())
    print_rows(rows)


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")

