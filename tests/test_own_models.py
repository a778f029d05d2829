"""Your own PyTorch language model: tiny models trained here in seconds (an LSTM over words, a
2-layer GRU over characters with dropout, a hand-written GPT with learned positions and no cache),
exported with ``export_model(module, ...)`` and run with everything the runtime offers, each
compared with the module itself run by plain PyTorch."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from lmrt.export import ExportError, export_model
from lmrt.runtime import Engine, Generator
from lmrt.runtime.manifest import load_manifest

WORDS = (
    "the cat sat on the mat . the dog sat on the log . a cat saw a dog and the dog ran to the park . "
    "the bird sang in the tree and a cat sat under the tree . the dog ran after the cat . "
    "a bird saw the dog on the log and the cat ran home . "
) * 6
CHARS = "the quick brown fox jumps over the lazy dog.\nthe lazy dog sleeps in the sun.\nthe fox runs home.\n" * 8


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models train fastest on one thread (and leave the other core to onnxruntime)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LstmLM(nn.Module):
    """The tutorial model: embedding, LSTM (batch first), linear head; forward(ids) -> logits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, vocab)

    def forward(self, ids):
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out)


class GruCharLM(nn.Module):
    """Two GRU layers, sequence first, dropout between them; forward returns (logits, hidden) and
    passes its own zero state, as many tutorials do."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.gru = nn.GRU(32, 64, num_layers=2, dropout=0.2)
        self.drop = nn.Dropout(0.1)
        self.decoder = nn.Linear(64, vocab)

    def forward(self, ids):
        hidden = torch.zeros(2, ids.shape[0], 64)
        out, hidden = self.gru(self.embed(ids).transpose(0, 1), hidden)
        return self.decoder(self.drop(out.transpose(0, 1))), hidden


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, block: int, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.causal = causal
        self.register_buffer("mask", torch.tril(torch.ones(block, block)).bool())

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=-1))
        att = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        if self.causal:
            att = att.masked_fill(~self.mask[:t, :t], float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class TinyGPT(nn.Module):
    """A GPT written by hand: token and learned position embeddings, pre-norm blocks, no cache."""

    def __init__(self, vocab: int, block: int = 32, dim: int = 64, heads: int = 4, layers: int = 2, causal: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.attn = nn.ModuleList(CausalSelfAttention(dim, heads, block, causal) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers + 1))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(self.norms[2 * i](x))
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(self.norms[-1](x))


def train(module: nn.Module, data: list[int], steps: int, seq: int = 24, batch: int = 16) -> None:
    torch.manual_seed(0)
    ids = torch.tensor(data)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        y = torch.stack([ids[s + 1 : s + seq + 1] for s in starts])
        logits = logits_of(module, x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def logits_of(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = module(ids)
    return out[0] if isinstance(out, tuple) else out


def eval_logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The module's logits in eval mode (no dropout), its mode put back after."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return logits_of(module, ids)
    finally:
        module.train(training)


def next_logits(module: nn.Module, ids: list[int]) -> torch.Tensor:
    """The module's logits after ``ids``, over the whole sequence (no state carried)."""
    return eval_logits(module, torch.tensor([ids]))[0, -1].double()


def torch_greedy(module: nn.Module, ids: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(next_logits(module, ids + out).argmax()))
    return out


def torch_beam_search(module: nn.Module, ids: list[int], k: int, n: int) -> list[int]:
    """Plain beam search: the k best continuations by summed log-probability, n tokens long."""
    beams = [(0.0, [])]
    for _ in range(n):
        candidates = []
        for score, tokens in beams:
            logp = torch.log_softmax(next_logits(module, ids + tokens), -1)
            candidates += [(score + float(lp), tokens + [t]) for t, lp in enumerate(logp)]
        beams = sorted(candidates, key=lambda c: -c[0])[:k]
    return beams[0][1]


def torch_perplexity(module: nn.Module, ids: list[int]) -> float:
    logits = eval_logits(module, torch.tensor([ids]))[0, :-1].double()
    return float(torch.exp(nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))


@pytest.fixture(scope="module")
def word_lstm(tmp_path_factory):
    vocab = sorted(set(WORDS.split())) + ["<eos>"]
    module = LstmLM(len(vocab))
    train(module, [vocab.index(w) for w in WORDS.split()], steps=80)
    out = tmp_path_factory.mktemp("own") / "lstm"
    module.eval()
    export_model(module, str(out), tokenizer=vocab, progress=lambda line: None)
    return module, vocab, Generator(str(out), provider="cpu")


@pytest.fixture(scope="module")
def char_gru(tmp_path_factory):
    vocab = sorted(set(CHARS))
    module = GruCharLM(len(vocab))
    train(module, [vocab.index(c) for c in CHARS], steps=80)
    assert module.training  # exported as the training loop left it: lmrt switches dropout off itself
    out = tmp_path_factory.mktemp("own") / "gru"
    export_model(module, str(out), tokenizer=vocab, progress=lambda line: None)
    return module, vocab, Generator(str(out), provider="cpu")


@pytest.fixture(scope="module")
def word_gpt(tmp_path_factory):
    vocab = sorted(set(WORDS.split()))
    module = TinyGPT(len(vocab))
    train(module, [vocab.index(w) for w in WORDS.split()], steps=60)
    out = tmp_path_factory.mktemp("own") / "gpt"
    module.eval()
    lines = []
    export_model(module, str(out), tokenizer=vocab, progress=lines.append)
    return module, vocab, Generator(str(out), provider="cpu"), lines


@pytest.fixture(params=["word_lstm", "char_gru", "word_gpt"])
def own(request):
    return request.getfixturevalue(request.param)[:3]


PROMPTS = {
    "word_lstm": ["the cat", "a bird saw", "the dog ran to the"],
    "char_gru": ["the q", "the lazy d", "fox"],
    "word_gpt": ["the cat", "a bird saw the", "the dog ran to the park"],
}
TEXTS = {"word_lstm": WORDS, "char_gru": CHARS}


def prompt_ids(gen: Generator, request) -> list[list[int]]:
    return [gen.encode(p) for p in PROMPTS[request.node.callspec.params["own"]]]


# --- export --------------------------------------------------------------------------------------


def test_export_leaves_the_callers_module_as_it_was(char_gru):
    module, _, gen = char_gru
    assert module.training and module.gru.training and module.drop.training
    v = gen.manifest.validation
    assert v["passed"] and v["greedy_tokens_identical"] and v["max_rel_diff"] <= v["tolerance"]


def test_the_manifest_describes_each_recurrent_state(word_lstm, char_gru):
    lstm, gru = load_manifest(word_lstm[2].model_dir), load_manifest(char_gru[2].model_dir)
    assert [(s.past, s.kind, s.shape) for s in lstm.graph.state] == [
        ("past_state.lstm.h", "fixed", (1, 64)), ("past_state.lstm.c", "fixed", (1, 64))
    ]  # fmt: skip
    assert [(s.past, s.present, s.shape) for s in gru.graph.state] == [("past_state.gru.h", "present_state.gru.h", (2, 64))]
    assert lstm.architecture.family == "recurrent" and lstm.graph.io.attention_mask == ""


def test_a_plain_vocabulary_becomes_the_tokenizer(word_lstm, char_gru):
    _, words, wgen = word_lstm
    _, chars, cgen = char_gru
    assert wgen.encode("the cat sat") == [words.index(w) for w in ("the", "cat", "sat")]
    assert wgen.decode([words.index("dog"), words.index("ran")]) == "dog ran"
    assert wgen.manifest.tokenizer.eos_token_ids == (words.index("<eos>"),)
    assert cgen.encode("fox.\n") == [chars.index(c) for c in "fox.\n"]
    assert cgen.decode(cgen.encode("the lazy dog")) == "the lazy dog"


# --- generation against PyTorch -------------------------------------------------------------------


def test_greedy_tokens_equal_a_pytorch_loop(own, request):
    module, _, gen = own
    for ids in prompt_ids(gen, request):
        got = gen.generate_batch([ids], max_new_tokens=12, stop_token_ids=[])[0][0].token_ids
        assert got == torch_greedy(module, ids, 12)


def test_a_batch_equals_each_prompt_alone(own, request):
    _, _, gen = own
    prompts = prompt_ids(gen, request)
    for options in ({}, {"temperature": 0.9, "top_k": 5, "seed": 7}):
        batch = gen.generate_batch(prompts, max_new_tokens=10, stop_token_ids=[], **options)
        alone = [gen.generate_batch([p], max_new_tokens=10, stop_token_ids=[], **options)[0] for p in prompts]
        assert [[c.token_ids for c in r] for r in batch] == [[c.token_ids for c in r] for r in alone]


def test_beams_equal_a_pytorch_beam_search(own, request):
    module, _, gen = own
    for ids in prompt_ids(gen, request)[:2]:
        got = gen.generate_batch([ids], num_beams=3, max_new_tokens=5, stop_token_ids=[])[0][0].token_ids
        assert got == torch_beam_search(module, ids, 3, 5)


def test_samples_of_one_prompt_carry_their_own_state(own, request):
    """n samples of one prompt start from copies of its row: each token's log-probability is the
    module's own given the prompt and that sample's earlier tokens."""
    module, _, gen = own
    ids = prompt_ids(gen, request)[0]
    options = dict(max_new_tokens=8, stop_token_ids=[], temperature=1.5, seed=3, num_return_sequences=3)
    samples = gen.generate_batch([ids], logprobs=0, **options)[0]
    assert [c.token_ids for c in samples] == [c.token_ids for c in gen.generate_batch([ids], **options)[0]]
    for c in samples:
        expected = [float(torch.log_softmax(next_logits(module, ids + c.token_ids[:i]), -1)[t]) for i, t in enumerate(c.token_ids)]
        assert [lp.logprob for lp in c.logprobs] == pytest.approx(expected, abs=1e-4)


def test_stop_strings_cut_the_text(word_lstm):
    _, _, gen = word_lstm
    text = gen.generate("the cat", max_new_tokens=12, stop_token_ids=[])
    words = text.split()
    stop = words[3]
    assert gen.generate("the cat", max_new_tokens=12, stop_token_ids=[], stop=[stop]) == text[: text.index(stop)]


def test_perplexity_equals_pytorch(own, request):
    module, _, gen = own
    ids = gen.encode(TEXTS.get(request.node.callspec.params["own"], WORDS)[:400])[: gen.context_length]
    assert gen.score(ids).perplexity == pytest.approx(torch_perplexity(module, ids), rel=1e-3)


def test_the_engine_prefills_in_chunks_and_reuses_a_row_from_its_snapshots(word_lstm):
    """A recurrent row is reused whole by a next turn, and in part from the snapshot taken at a
    prompt chunk's boundary by a prompt that shares only the start of it."""
    _, _, gen = word_lstm
    engine = Engine(gen.model, slots=2, ctx_size=128, prefill_chunk=3)
    try:
        first = gen.encode("the bird sang in the tree and a cat")
        config = gen.config(max_new_tokens=6, stop_token_ids=[])
        tokens, request = collect(engine, first, config)
        assert tokens == gen.generate_batch([first], max_new_tokens=6, stop_token_ids=[])[0][0].token_ids
        history = first + tokens + gen.encode("and the dog")
        tokens2, request2 = collect(engine, history, config)
        assert request2.cached_tokens == len(first) + len(tokens) - 1  # the row held all of it
        assert tokens2 == gen.generate_batch([history], max_new_tokens=6, stop_token_ids=[])[0][0].token_ids
        partial = first[:5] + gen.encode("dog")  # shares 5 tokens: the snapshot after the first chunk holds 3
        tokens3, request3 = collect(engine, partial, config)
        assert request3.cached_tokens == 5 // 3 * 3
        assert tokens3 == gen.generate_batch([partial], max_new_tokens=6, stop_token_ids=[])[0][0].token_ids
        assert engine.status().stats.cached_prompt_tokens == request2.cached_tokens + request3.cached_tokens
    finally:
        engine.close()


def collect(engine, ids, config):
    done = threading.Event()

    def on_event(event):
        if event.finish_reason is not None:
            done.set()

    request = engine.request(ids, config, on_event)
    engine.submit(request)
    assert done.wait(60)
    return list(request.choices[0].tokens), request


# --- a module without a state: its window ----------------------------------------------------------


def test_a_stateless_module_says_it_reruns_its_window(word_gpt, capsys):
    from lmrt.cli.info import info

    _, _, gen, lines = word_gpt
    assert sum("exported as a whole-window graph of 32 tokens (its position table pos)" in line for line in lines) == 1
    assert gen.manifest.graph.decoding == "window" and gen.context_length == 32 and not gen.manifest.graph.state
    info.main([gen.model_dir], standalone_mode=False)
    assert "no state: each step runs the sequence again, up to its window of 32 tokens" in capsys.readouterr().out


def test_a_window_graph_speculates_like_any_cache(word_gpt):
    _, _, gen, _ = word_gpt
    prompt = gen.encode("the cat sat on the mat . the cat sat on the")
    plain = gen.generate_batch([prompt], max_new_tokens=12, stop_token_ids=[], speculation="off")[0][0].token_ids
    before = gen.stats.accepted_tokens
    assert gen.generate_batch([prompt], max_new_tokens=12, stop_token_ids=[], speculation="on")[0][0].token_ids == plain
    assert gen.stats.accepted_tokens > before  # rows went back over rejected tokens and went on


class Bigram(nn.Module):
    """Causal with no state and no position table: each position sees its own token only."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 32)
        self.head = nn.Linear(32, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.embedding(ids)))


def test_max_length_gives_a_module_without_positions_its_window(tmp_path):
    module = Bigram(4)
    export_model(module, str(tmp_path / "bigram"), tokenizer=VOCAB, max_length=8, progress=lambda line: None)
    gen = Generator(str(tmp_path / "bigram"), provider="cpu")
    assert gen.context_length == 8
    assert gen.generate_batch([[1, 2]], max_new_tokens=5, stop_token_ids=[])[0][0].token_ids == torch_greedy(module, [1, 2], 5)


# --- a recurrent row goes back from its snapshots --------------------------------------------------

REPEATING = {"word_lstm": "the cat sat on the mat . the dog sat on the log . the cat sat on the", "char_gru": "the lazy dog. the lazy fox. the lazy"}


@pytest.mark.parametrize("name", ["word_lstm", "char_gru"])
def test_speculation_on_equals_greedy_without(name, request):
    """Proposals rejected in part send the row back to its snapshot before the check; the tokens
    are exactly greedy decoding's without speculation (and auto leaves a recurrent model alone)."""
    module, _, gen = request.getfixturevalue(name)
    prompt = gen.encode(REPEATING[name])
    plain = gen.generate_batch([prompt], max_new_tokens=24, stop_token_ids=[], speculation="off")[0][0].token_ids
    assert plain == torch_greedy(module, prompt, 24)
    stats, before = gen.stats, (gen.stats.proposed_tokens, gen.stats.accepted_tokens)
    assert gen.generate_batch([prompt], max_new_tokens=24, stop_token_ids=[], speculation="on")[0][0].token_ids == plain
    proposed, accepted = stats.proposed_tokens - before[0], stats.accepted_tokens - before[1]
    assert 0 < accepted < proposed  # some were taken, some were rolled back
    gen.generate_batch([prompt], max_new_tokens=8, stop_token_ids=[], speculation="auto")
    assert stats.proposed_tokens - before[0] == proposed


def test_rows_rolled_back_to_different_lengths_step_together(word_lstm):
    """Rows gone back to a snapshot, between snapshots (tokens pending) or to the start take one
    step together: each one's logits are the module's after exactly the tokens it kept."""
    module, _, gen = word_lstm
    ids = gen.encode("the dog ran to the park . the bird sang in the tree")
    store = gen.model.new_state(3, 32)
    for row in range(3):
        for at in range(0, 12, 4):  # chunks of 4: snapshots at 4 and 8
            gen.model.forward(store, np.array([ids[at : at + 4]]), keep=1, row=row)
    for row, length in enumerate([8, 6, 0]):  # a snapshot; 2 tokens past one; the start
        store.truncate(row, length)
        assert list(store.tokens(row)) == ids[:length]
    assert store.pending_rows(0, 3) == [1]
    step = [gen.encode("the")[0], gen.encode("cat")[0], gen.encode("a")[0]]
    logits = gen.model.forward(store, np.array(step)[:, None], keep=1)[:, 0]
    for row, length in enumerate([8, 6, 0]):
        expected = next_logits(module, ids[:length] + [step[row]]).numpy()
        np.testing.assert_allclose(logits[row], expected, rtol=1e-4, atol=1e-4)
        assert list(store.tokens(row)) == ids[:length] + [step[row]] and store.pending_rows(row, 1) == []


def test_snapshots_per_row_are_bounded_and_spread(word_lstm):
    from lmrt.runtime.state_snapshots import PER_ROW

    _, _, gen = word_lstm
    store = gen.model.new_state(1, 128)
    ids = gen.encode(WORDS)[:100]
    for at in range(0, 100, 2):
        gen.model.forward(store, np.array([ids[at : at + 2]]), keep=1, row=0)
    held = sorted(int(n) for n in store.buffers.snapshots.lengths[0] if n)
    assert len(held) == PER_ROW and held[-1] == 98 and max(np.diff([0] + held)) <= 2 * 100 / PER_ROW  # thinned, spread over the row
    store.truncate(0, 51)
    assert store.reusable_prefix(0, np.array(ids[:60])) == max(n for n in held if n <= 51)


# --- int8 ------------------------------------------------------------------------------------------


def quantized_export(module, vocab, text: str, precision: str, tmp_path):
    """``module`` exported at ``precision`` with ``text`` as its evaluation text, past its gate: (its
    manifest, a Generator of it)."""
    path = tmp_path / "eval.txt"
    path.write_text(text)
    manifest = export_model(module, str(tmp_path / precision), tokenizer=vocab, precision=precision, eval_text=str(path), progress=lambda line: None)
    assert manifest.quality["passed"] and manifest.quality["increase"] <= manifest.quality["max_increase"]
    return manifest, Generator(str(tmp_path / precision), provider="cpu")


def test_int8_passes_its_gate(word_lstm, tmp_path):
    module, vocab, _ = word_lstm
    manifest, gen = quantized_export(module, vocab, WORDS, "int8", tmp_path)
    assert manifest.quantization["quantized"]["linear"] >= 1 and manifest.quantization["quantized"]["embedding"] == 1
    assert gen.score(gen.encode(WORDS[:300])).perplexity == pytest.approx(manifest.quality["perplexity"], rel=0.5)


def test_int8_with_the_default_text_outside_a_word_vocabulary_is_one_line(word_lstm, tmp_path):
    """A word vocabulary without <unk> cannot spell the built-in English evaluation text: one line
    that asks for a text in the model's vocabulary, and nothing written."""
    module, vocab, _ = word_lstm
    from lmrt.quantize import QuantizeError

    with pytest.raises(QuantizeError, match="the tokenizer cannot read .*give an evaluation text in the model's vocabulary") as e:
        export_model(module, str(tmp_path / "int8"), tokenizer=vocab, precision="int8", progress=lambda line: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "int8").exists()


def recurrent_nodes(out_dir, manifest):
    """The graph's recurrent nodes and its initializers by name."""
    import onnx

    graph = onnx.load(str(out_dir / manifest.graph.file)).graph
    return [n for n in graph.node if n.op_type in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM")], {t.name: t for t in graph.initializer}


def test_int8_quantizes_the_lstm_matrices(word_lstm, tmp_path):
    import onnx

    module, vocab, fp32 = word_lstm
    text = tmp_path / "eval.txt"
    text.write_text(WORDS)
    out = tmp_path / "int8"
    manifest = export_model(module, str(out), tokenizer=vocab, precision="int8", eval_text=str(text), progress=lambda line: None)
    assert manifest.quality["passed"] and manifest.quantization["quantized"]["recurrent"] == 2  # the layer's W and R
    assert "DynamicQuantizeLSTM" in manifest.quantization["weights"] and "recurrent" not in manifest.quantization["left_in_float"]
    nodes, inits = recurrent_nodes(out, manifest)
    assert [n.op_type for n in nodes] == ["DynamicQuantizeLSTM"]
    w, r = (inits[name] for name in nodes[0].input[1:3])
    assert w.data_type == r.data_type == onnx.TensorProto.INT8
    lstm = module.lstm  # [directions, input, 4 * hidden] and [directions, hidden, 4 * hidden]
    assert list(w.dims) == [1, lstm.input_size, 4 * lstm.hidden_size] and list(r.dims) == [1, lstm.hidden_size, 4 * lstm.hidden_size]
    gen = Generator(str(out), provider="cpu")
    for prompt in PROMPTS["word_lstm"]:
        ids = gen.encode(prompt)
        assert gen.generate_batch([ids], max_new_tokens=6, stop_token_ids=[])[0][0].token_ids == torch_greedy(module, ids, 6)
    ids = gen.encode(WORDS[:300])
    assert gen.score(ids).perplexity == pytest.approx(fp32.score(ids).perplexity, rel=manifest.quality["max_increase"])


def test_gru_matrices_stay_in_float(char_gru, tmp_path):
    """ONNX's GRU takes float matrices only, and onnxruntime has no quantized form of it."""
    module, vocab, _ = char_gru
    text = tmp_path / "eval.txt"
    text.write_text(CHARS)
    manifest = export_model(module, str(tmp_path / "int8"), tokenizer=vocab, precision="int8", eval_text=str(text), progress=lambda line: None)
    assert manifest.quality["passed"] and manifest.quantization["left_in_float"]["recurrent"] == 2 * module.gru.num_layers
    assert "recurrent" not in manifest.quantization["quantized"] and "recurrent_compute" not in manifest.quantization
    nodes, inits = recurrent_nodes(tmp_path / "int8", manifest)
    assert [n.op_type for n in nodes] == ["GRU"] * module.gru.num_layers
    assert all(inits[name].data_type == onnx_float() for n in nodes for name in n.input[1:3])


def onnx_float() -> int:
    import onnx

    return onnx.TensorProto.FLOAT


@pytest.mark.parametrize("options", [{"compute": "float"}, {"max_increase": 0.0, "allow_degraded": True}], ids=["float compute", "int8 missed the gate"])
def test_lstm_matrices_in_8_bits_computed_in_float(word_lstm, tmp_path, options):
    """With float compute, or when the 8-bit LSTM misses the gate (an allowed increase of 0), the
    8-bit codes are dequantized into the float LSTM: the file keeps 8 bits, the logits move only
    by the rounding of the matrices."""
    import onnx

    module, vocab, fp32 = word_lstm
    text = tmp_path / "eval.txt"
    text.write_text(WORDS)
    out = tmp_path / "int8"
    manifest = export_model(module, str(out), tokenizer=vocab, precision="int8", eval_text=str(text), progress=lambda line: None, **options)
    q = manifest.quantization
    assert q["recurrent_compute"] == "float" and q["quantized"]["recurrent"] == 2 and "dequantized to float" in q["weights"]
    if "max_increase" in options:
        assert q["recurrent_int8_compute"].startswith("missed the gate: perplexity")
    nodes, inits = recurrent_nodes(out, manifest)
    assert [n.op_type for n in nodes] == ["LSTM"] and all(name.endswith(".dequantized") for name in nodes[0].input[1:3])
    codes = [inits[name.removesuffix(".dequantized") + ".q8"] for name in nodes[0].input[1:3]]  # what Cast and Mul dequantize
    assert all(t.data_type == onnx.TensorProto.INT8 for t in codes)
    ids = Generator(str(out), provider="cpu").encode(WORDS[:300])
    assert Generator(str(out), provider="cpu").score(ids).perplexity == pytest.approx(fp32.score(ids).perplexity, rel=0.01)


# --- refusals, each one line ------------------------------------------------------------------------


class NotCausal(LstmLM):
    def forward(self, ids):
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out + out.mean(dim=1, keepdim=True))  # every position sees the whole sequence


class Untraceable(LstmLM):
    def forward(self, ids):
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out + torch.erfinv(torch.tanh(out) * 0.5))


class Bidirectional(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, vocab)

    def forward(self, ids):
        return self.head(self.lstm(self.embedding(ids))[0])


VOCAB = ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "module, tokenizer, message",
    [
        (LstmLM(5), VOCAB, "the module's logits have 5 entries but the tokenizer has 4 tokens"),
        (NotCausal(4), VOCAB, "the module is not causal: its logits at position 0 change"),
        (Untraceable(4), VOCAB, "cannot be traced into ONNX: it uses aten::erfinv"),
        (Bidirectional(4), VOCAB, "lstm is a bidirectional LSTM"),
        (LstmLM(4), None, "a module needs its tokenizer"),
        (LstmLM(4), ["a", "b", "a", "c"], "the vocabulary lists 'a' twice"),
        (TinyGPT(4, causal=False), VOCAB, "the module is not causal: its logits at position 0 change"),
        (Bigram(4), VOCAB, "no position table .* pass max_length="),
        ((TinyGPT(4), 64), VOCAB, "max_length 64 is longer than the module's position table pos"),
    ],
)
def test_refusals_are_one_line(module, tokenizer, message, tmp_path):
    module, options = (module[0], {"max_length": module[1]}) if isinstance(module, tuple) else (module, {})
    with pytest.raises(ExportError, match=message) as e:
        export_model(module, str(tmp_path / "out"), tokenizer=tokenizer, progress=lambda line: None, **options)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# --- the command line: a factory and a state_dict ----------------------------------------------------

MODEL_PY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(4, 32)
        self.rnn = nn.RNN(32, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, ids):
        return self.head(self.rnn(self.embedding(ids))[0])


def make_model():
    return Tiny()
'''


@pytest.fixture
def factory(tmp_path):
    """model.py with make_model, a trained state_dict of it, its vocabulary as JSON, and the module."""
    import json
    import sys

    (tmp_path / "model.py").write_text(MODEL_PY)
    sys.path.insert(0, str(tmp_path))
    try:
        import model as user_model  # the test's own copy, to compare with
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("model", None)
    module = user_model.make_model()
    train(module, [i % 4 for i in range(200)], steps=20)
    module.eval()
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    return tmp_path, module


def test_lmrt_export_builds_the_module_from_its_factory_and_weights(factory):
    from click.testing import CliRunner

    from lmrt.cli import main

    folder, module = factory
    out = folder / "out"
    args = ["export", f"{folder / 'model.py'}:make_model", "--weights", str(folder / "weights.pt"), "--tokenizer", str(folder / "vocab.json"), "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    gen = Generator(str(out), provider="cpu")
    assert gen.manifest.graph.state[0].shape == (2, 32)
    assert gen.generate_batch([[0, 1, 2]], max_new_tokens=6, stop_token_ids=[])[0][0].token_ids == torch_greedy(module, [0, 1, 2], 6)


def test_a_pickled_module_is_refused_saying_why(factory):
    from click.testing import CliRunner

    from lmrt.cli import main

    folder, _ = factory
    torch.save(LstmLM(4), folder / "whole.pt")  # torch.save(model): the whole module, pickled
    result = CliRunner().invoke(main, ["export", str(folder / "whole.pt"), "-o", str(folder / "out")])
    assert result.exit_code != 0 and not (folder / "out").exists()
    line = result.stderr.strip()
    assert "\n" not in line and "never unpickles a module, since unpickling runs code from the file" in line
    assert "save model.state_dict() instead" in line and "path/to/model.py:make_model --weights FILE" in line
    with pytest.raises(ExportError, match="never unpickles a module"):
        export_model(f"{folder / 'model.py'}:make_model", str(folder / "out"), weights=str(folder / "whole.pt"), tokenizer=VOCAB)
    with pytest.raises(ExportError, match="holds weights only; pass the code that builds the module"):
        export_model(str(folder / "weights.pt"), str(folder / "out"), tokenizer=VOCAB)
    with pytest.raises(ExportError, match="has no function or class 'make_it'"):
        export_model(f"{folder / 'model.py'}:make_it", str(folder / "out"), tokenizer=VOCAB)
