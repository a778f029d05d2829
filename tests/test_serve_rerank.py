"""``POST /v1/rerank`` (and ``/rerank``, ``/v2/rerank``) on a real ``lmrt serve`` of tiny random BERT
cross-encoders built here, checked against sentence-transformers' CrossEncoder and transformers;
and the servers of other models refusing it."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
import torch  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402

from serving import Server  # noqa: E402
from test_encoders import make_encoder, make_sentence_transformer  # noqa: E402
from lmrt import runtime  # noqa: E402
from lmrt.export import export_model  # noqa: E402

QUERY = "Where do small language models run?"
DOCUMENTS = [
    "Small language models run on edge devices, on boards with little memory.",
    "The capital of France is Paris.",
    "A runtime reads the manifest and loads the graph.",
    "Once upon a time there was a quick brown fox who jumped over the lazy dog again and again, " * 4,  # cut
    "北京是中国的首都。",
    "?",
]
HEADS = {"one logit": {"num_labels": 1}, "two labels": {"num_labels": 2}, "three labels": {"num_labels": 3}}


@pytest.fixture(scope="module")
def rerankers(tmp_path_factory):
    """{head: (hf dir, torch model, exported dir)} for tiny BERT sequence classifiers."""
    out = {}
    for name, head in HEADS.items():
        root = tmp_path_factory.mktemp("rerank")
        path, model = make_encoder("bert", root, head)
        exported = str(root / "lmrt")
        export_model(path, exported, progress=lambda _: None)
        out[name] = (path, model, exported)
    return out


@pytest.fixture(scope="module")
def server(rerankers):
    server = Server(rerankers["one logit"][2], "--model-name", "rr")
    yield server
    server.stop()


def reference(rerankers, head: str, documents=DOCUMENTS) -> np.ndarray:
    """CrossEncoder's scores (one logit: its sigmoid); for two labels, transformers' softmax of
    the second, as CrossEncoder returns both logits."""
    path, model, exported = rerankers[head]
    length = runtime.Encoder(exported).max_length
    cross = CrossEncoder(path, max_length=length, device="cpu")
    if head == "one logit":
        return cross.predict([(QUERY, d) for d in documents])
    logits = torch.tensor(cross.predict([(QUERY, d) for d in documents], activation_fn=torch.nn.Identity()))
    return torch.softmax(logits, -1)[:, 1].numpy()


@pytest.mark.parametrize("head", ["one logit", "two labels"])
def test_pair_scores_equal_cross_encoder(rerankers, head):
    encoder = runtime.Encoder(rerankers[head][2])
    got = encoder.pair_scores([(QUERY, d) for d in DOCUMENTS], batch_size=4)
    np.testing.assert_allclose(got, reference(rerankers, head), rtol=0, atol=1e-4)
    # the second text's token type matters: scored as type 0 throughout, the pairs score otherwise
    ids, types = encoder.tokenize_pairs([(QUERY, d) for d in DOCUMENTS])
    assert any(t == 1 for row in types for t in row)
    flat = encoder.pair_scores_of_ids(ids, [[0] * len(t) for t in types])
    assert np.abs(flat - got).max() > 1e-3


def test_a_classifier_of_more_labels_is_no_cross_encoder(rerankers):
    with pytest.raises(ValueError, match="3 labels"):
        runtime.Encoder(rerankers["three labels"][2]).pair_scores([(QUERY, "x")])


def test_rerank_orders_by_cross_encoder_score(server, rerankers):
    expected = reference(rerankers, "one logit")
    status, body = server.raw("POST", "/v1/rerank", json.dumps({"model": "rr", "query": QUERY, "documents": DOCUMENTS}).encode())
    assert status == 200, body
    results = body["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected, kind="stable"))
    scores = [r["relevance_score"] for r in results]
    np.testing.assert_allclose(scores, expected[[r["index"] for r in results]], rtol=0, atol=1e-4)
    assert scores == sorted(scores, reverse=True)
    assert [r["document"]["text"] for r in results] == [DOCUMENTS[r["index"]] for r in results]
    ids, _ = runtime.Encoder(rerankers["one logit"][2]).tokenize_pairs([(QUERY, d) for d in DOCUMENTS])
    assert body["usage"]["total_tokens"] == sum(len(i) for i in ids) and body["model"] == "rr"


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_top_n_return_documents_and_the_three_paths(server, path):
    full = server.raw("POST", "/v1/rerank", json.dumps({"model": "rr", "query": QUERY, "documents": DOCUMENTS}).encode())[1]
    documents = [{"text": d} for d in DOCUMENTS]  # Cohere's objects, the same texts
    body = {"model": "rr", "query": QUERY, "documents": documents, "top_n": 2, "return_documents": False}
    status, got = server.raw("POST", path, json.dumps(body).encode())
    assert status == 200
    assert [(r["index"], r["relevance_score"]) for r in got["results"]] == [
        (r["index"], r["relevance_score"]) for r in full["results"][:2]]  # fmt: skip
    assert all("document" not in r for r in got["results"])
    many = server.raw("POST", path, json.dumps({**body, "top_n": 50}).encode())[1]
    assert len(many["results"]) == len(DOCUMENTS)


BAD = [
    ("no query", {"documents": ["a"]}, "query"),
    ("empty query", {"query": "", "documents": ["a"]}, "query"),
    ("no documents", {"query": "q", "documents": []}, "documents"),
    ("document type", {"query": "q", "documents": [3]}, "documents"),
    ("document object", {"query": "q", "documents": [{"content": "a"}]}, "documents"),
    ("too many", {"query": "q", "documents": ["a"] * 1001}, "documents"),
    ("top_n", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ("return_documents", {"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
    ("unknown field", {"query": "q", "documents": ["a"], "rank_fields": ["x"]}, "rank_fields"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_rerank_requests_are_400s(server, case):
    _, body, param = case
    status, got = server.raw("POST", "/v1/rerank", json.dumps({"model": "rr", **body}).encode())
    assert status == 400 and got["error"]["param"] == param, got


def test_other_models_refuse_rerank(rerankers, tiny_models, tmp_path):
    embedder = str(tmp_path / "embed")
    export_model(make_sentence_transformer("bert", tmp_path, "mean", True), embedder, progress=lambda _: None)
    cases = [(tiny_models["llama"][2], "generation model"), (embedder, "embedding model"),
             (rerankers["three labels"][2], "3 labels")]  # fmt: skip
    for model_dir, why in cases:
        server = Server(model_dir, "--model-name", "m")
        try:
            status, got = server.raw("POST", "/v1/rerank", json.dumps({"model": "m", "query": "q", "documents": ["a"]}).encode())
        finally:
            server.stop()
        assert status == 400 and why in got["error"]["message"] and got["error"]["code"] == "model_not_reranker"
