"""GGUF K-quants (and Q5_0 / Q5_1) kept exactly: a tiny Llama written here as a GGUF file with those
block types, as Q4_K_M-style files mix them, exported through transformers' GGUF loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import gguf_random_blocks, train_tokenizer
from lmrt import runtime
from lmrt.export import export_model
from lmrt.quantize.gguf_blocks import GGUFBlocks

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 256, 512, 4, 2  # K-quant rows hold whole blocks of 256
LAYERS = [  # the GGUF type of each matrix, layer by layer: q/k/v and gate/up rows of mixed types
    dict(attn_q="Q4_K", attn_k="Q4_K", attn_v="Q6_K", attn_output="Q5_K", ffn_gate="Q4_K", ffn_up="Q4_K", ffn_down="Q6_K"),
    dict(attn_q="Q5_1", attn_k="Q5_1", attn_v="Q5_1", attn_output="Q4_0", ffn_gate="Q4_1", ffn_up="Q4_K", ffn_down="Q8_0"),
]  # fmt: skip
quiet = dict(progress=lambda _: None)


def write_llama_gguf(path: str, tokenizer, layers: list[dict], embed: str = "Q5_0", output: str = "Q6_K") -> None:
    """A Llama GGUF file with random blocks of the given types and the tokenizer's vocabulary."""
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(0)
    vocab, head = len(tokenizer), HIDDEN // HEADS
    w = GGUFWriter(path, "llama")
    w.add_name("tiny-kquants")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(len(layers))
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head)
    w.add_vocab_size(vocab)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == tokenizer.eos_token else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_bos_token_id(tokenizer.eos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)

    def blocks(name: str, kind: str, rows: int, cols: int) -> None:
        w.add_tensor(name, gguf_random_blocks(kind, rows, cols, rng), raw_dtype=GGMLQuantizationType[kind])

    def norm(name: str) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    shapes = dict(attn_q=(HIDDEN, HIDDEN), attn_k=(KV_HEADS * head, HIDDEN), attn_v=(KV_HEADS * head, HIDDEN),
                  attn_output=(HIDDEN, HIDDEN), ffn_gate=(INTERMEDIATE, HIDDEN), ffn_up=(INTERMEDIATE, HIDDEN),
                  ffn_down=(HIDDEN, INTERMEDIATE))  # fmt: skip
    blocks("token_embd.weight", embed, vocab, HIDDEN)
    for i, types in enumerate(layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for name, kind in types.items():
            blocks(f"blk.{i}.{name}.weight", kind, *shapes[name])
    norm("output_norm.weight")
    blocks("output.weight", output, vocab, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquants")
    path = str(root / "tiny-kquants.gguf")
    write_llama_gguf(path, train_tokenizer(str(root / "tokenizer")), LAYERS)
    return path


def logits(model_dir: str, ids: list[int]) -> np.ndarray:
    return runtime.LoadedModel(model_dir, provider="cpu").sequence_logits(ids)


def test_int4_keeps_every_block_and_reproduces_the_dequantized_model(kquant_gguf, tmp_path):
    """With float compute the kept blocks give the fp32 model's perplexity (the gate measures both
    on the same text) and its logits."""
    out = str(tmp_path / "int4")
    m = export_model(kquant_gguf, out, precision="int4", compute="float", **quiet)
    kept = m.quantization["gguf_blocks"]["kept"]
    assert m.quantization["gguf_blocks"]["requantized"] == {}
    assert kept == {
        "model.layers.0.attn.qkv.weight": "Q4_K+Q6_K as 8-bit blocks of 16",
        "model.layers.0.self_attn.o_proj.weight": "Q5_K as 8-bit blocks of 32",
        "model.layers.0.mlp.up.weight": "Q4_K as 4-bit blocks of 32",
        "model.layers.0.mlp.down_proj.weight": "Q6_K as 8-bit blocks of 16",
        "model.layers.1.attn.qkv.weight": "Q5_1 as 8-bit blocks of 32",
        "model.layers.1.self_attn.o_proj.weight": "Q4_0 as 4-bit blocks of 32",
        "model.layers.1.mlp.up.weight": "Q4_1+Q4_K as 4-bit blocks of 32",
        "model.layers.1.mlp.down_proj.weight": "Q8_0 as 8-bit blocks of 32",
        "lm_head.weight": "Q6_K as 8-bit blocks of 16",
        "model.embed_tokens.weight": "Q5_0 as 8-bit blocks of 32",
    }
    assert abs(m.quality["increase"]) <= 0.001 and m.quality["top1_agreement"] >= 0.99
    fp32 = str(tmp_path / "fp32")
    export_model(kquant_gguf, fp32, **quiet)
    ids = runtime.Generator(fp32).encode("The capital of France is Paris. Small models run on edge devices.")
    ref, got = logits(fp32, ids), logits(out, ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_int8_keeps_the_blocks_of_eight_bits_and_lists_the_rest(kquant_gguf, tmp_path):
    m = export_model(kquant_gguf, str(tmp_path / "int8"), precision="int8", compute="float", **quiet)
    blocks = m.quantization["gguf_blocks"]
    assert blocks["requantized"] == {
        "model.layers.0.mlp.up.weight": "Q4_K: 4-bit blocks, fewer bits than the scheme's 8",
        "model.layers.1.self_attn.o_proj.weight": "Q4_0: 4-bit blocks, fewer bits than the scheme's 8",
        "model.layers.1.mlp.up.weight": "Q4_1+Q4_K: 4-bit blocks, fewer bits than the scheme's 8",
    }
    assert len(blocks["kept"]) == 7 and m.quantization["gguf_blocks_kept"]["lm_head (Q6_K)"] == 1
    assert abs(m.quality["increase"]) <= 0.01


def test_blocks_without_an_exact_layout_are_named(tmp_path):
    """Q3_K blocks and float matrices are matched by value but not kept; the reason is given."""
    path = str(tmp_path / "q3.gguf")
    write_llama_gguf(path, train_tokenizer(str(tmp_path / "tokenizer")), [dict(attn_q="Q3_K")], embed="Q8_0")
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    index = GGUFBlocks(path)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    q3 = dequantize(np.asarray(tensors["blk.0.attn_q.weight"].data), GGMLQuantizationType.Q3_K)
    match = index.find(q3, 4)
    assert match.blocks is None and match.reason == "Q3_K has no exact MatMulNBits layout"
    embed = dequantize(np.asarray(tensors["token_embd.weight"].data), GGMLQuantizationType.Q8_0)
    assert index.find(embed[:3], 8).how == "Q8_0 as 8-bit blocks of 32"
    assert index.find(embed[:3] + 1, 8).reason == "not all of its rows are in the file"
