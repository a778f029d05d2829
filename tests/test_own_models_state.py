"""Modules that carry their own state, ``forward(ids, state) -> (logits, new_state)``: a GPT written
by hand with its own KV cache (kind "kv") and a custom recurrence with a fixed state, trained here,
exported (the state inferred from a traced step, or declared with ``state=``) and run by the
runtime, each compared with a plain PyTorch loop that carries the module's state."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from test_own_models import WORDS, one_torch_thread, torch_beam_search, torch_perplexity, train  # noqa: F401 (one_torch_thread: autouse)
from lmrt.export import ExportError, export_model
from lmrt.runtime import Engine, Generator
from lmrt.runtime.manifest import load_manifest

VOCAB = sorted(set(WORDS.split()))
DATA = [VOCAB.index(w) for w in WORDS.split()]
PROMPTS = ["the cat", "a bird saw the dog on", "the dog ran to the park . the"]
HEADS, HEAD_SIZE, MEMORY = 4, 16, 48


class KvAttention(nn.Module):
    def __init__(self, block: int):
        super().__init__()
        self.qkv = nn.Linear(HEADS * HEAD_SIZE, 3 * HEADS * HEAD_SIZE)
        self.proj = nn.Linear(HEADS * HEAD_SIZE, HEADS * HEAD_SIZE)
        self.register_buffer("mask", torch.tril(torch.ones(block, block)).bool())

    def forward(self, x, past):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, HEADS, HEAD_SIZE).transpose(1, 2) for z in self.qkv(x).split(d, dim=-1))
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        held = k.shape[2] - t
        att = (q @ k.transpose(-2, -1) / HEAD_SIZE**0.5).masked_fill(~self.mask[held : held + t, : held + t], float("-inf"))
        return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)), (k, v)


class KvGPT(nn.Module):
    """A GPT written by hand with its own KV cache: state None at the start, then a list of (keys,
    values) per layer, [batch, heads, positions, head size]."""

    def __init__(self, vocab: int, block: int = 32, layers: int = 2):
        super().__init__()
        dim = HEADS * HEAD_SIZE
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.attn = nn.ModuleList(KvAttention(block) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers + 1))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, state=None):
        b, t = ids.shape
        if state is None:
            state = [(torch.zeros(b, HEADS, 0, HEAD_SIZE), torch.zeros(b, HEADS, 0, HEAD_SIZE)) for _ in self.attn]
        held = state[0][0].shape[2]
        x = self.tok(ids) + self.pos(torch.arange(held, held + t))
        new = []
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            y, kv = attn(self.norms[2 * i](x), state[i])
            x = x + y
            x = x + mlp(self.norms[2 * i + 1](x))
            new.append(kv)
        return self.head(self.norms[-1](x)), new


class FadingMemory(nn.Module):
    """A custom recurrence: memory_t = a * memory_{t-1} + (1 - a) * W x_t, per channel, computed for a
    whole chunk at once (no loop over time); its state is a dict holding the memory [batch, MEMORY]."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 32)
        self.inp = nn.Linear(32, MEMORY)
        self.decay = nn.Parameter(torch.linspace(-1.0, 2.0, MEMORY))
        self.head = nn.Linear(MEMORY + 32, vocab)

    def forward(self, ids, state=None):
        e = self.embedding(ids)
        x = self.inp(e)
        start = torch.zeros(ids.shape[0], MEMORY) if state is None else state["memory"]
        a = torch.sigmoid(self.decay)
        t = torch.arange(ids.shape[1])
        gap = (t[:, None] - t[None, :]).float()[..., None]  # [t, s, 1]
        weights = torch.where(gap >= 0, a ** gap.clamp(min=0), torch.zeros(()))  # [t, s, channel]
        memory = torch.einsum("tsc,bsc->btc", weights, (1 - a) * x) + a ** (t[:, None] + 1).float() * start[:, None]
        return self.head(torch.cat([torch.tanh(memory), e], dim=-1)), {"memory": memory[:, -1]}


def carried_greedy(module: nn.Module, ids: list[int], n: int) -> list[int]:
    """Greedy decoding the way a user writes it: the prompt once, then one token at a time with the
    module's state carried."""
    module.eval()
    with torch.no_grad():
        logits, state = module(torch.tensor([ids]), None)
        out = []
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits, state = module(torch.tensor([[out[-1]]]), state)
    return out


def exported(tmp_path_factory, module, name: str, steps: int, **options):
    train(module, DATA, steps=steps)
    module.eval()
    out = tmp_path_factory.mktemp("state") / name
    export_model(module, str(out), tokenizer=VOCAB, progress=lambda line: None, **options)
    return module, Generator(str(out), provider="cpu")


@pytest.fixture(scope="module")
def kv_gpt(tmp_path_factory):
    torch.manual_seed(0)  # the initial weights too: the answers the tests check are the same each run
    return exported(tmp_path_factory, KvGPT(len(VOCAB)), "kv", 60)  # state inferred: forward(ids, state)


@pytest.fixture(scope="module")
def fading(tmp_path_factory):
    torch.manual_seed(0)
    return exported(tmp_path_factory, FadingMemory(len(VOCAB)), "fading", 80, state={"memory": ("fixed", (MEMORY,))})


@pytest.fixture(params=["kv_gpt", "fading"])
def own(request):
    return request.getfixturevalue(request.param)


def test_the_manifest_describes_the_declared_state(kv_gpt, fading):
    kv, fixed = load_manifest(kv_gpt[1].model_dir), load_manifest(fading[1].model_dir)
    assert [(s.past, s.present, s.kind, s.shape) for s in kv.graph.state] == [
        (f"past_state.{layer}.{part}", f"present_state.{layer}.{part}", "kv", (HEADS, HEAD_SIZE)) for layer in range(2) for part in range(2)
    ]
    assert kv.graph.decoding == "declared" and kv.architecture.context_length == 32  # its position table
    assert [(s.past, s.kind, s.shape) for s in fixed.graph.state] == [("past_state.memory", "fixed", (MEMORY,))]
    assert fixed.graph.decoding == "step" and fixed.architecture.family == "declared"
    assert kv.validation["greedy_tokens_identical"] and fixed.validation["greedy_tokens_identical"]


def test_greedy_equals_a_pytorch_loop_carrying_the_state(own):
    module, gen = own
    for prompt in PROMPTS:
        ids = gen.encode(prompt)
        got = gen.generate_batch([ids], max_new_tokens=10, stop_token_ids=[])[0][0].token_ids
        assert got == carried_greedy(module, ids, 10)


def test_a_batch_of_different_lengths_equals_each_prompt_alone(own):
    _, gen = own
    for options in ({}, {"temperature": 0.9, "top_k": 5, "seed": 7}):
        batch = gen.generate_batch(PROMPTS, max_new_tokens=8, stop_token_ids=[], **options)
        alone = [gen.generate_batch([p], max_new_tokens=8, stop_token_ids=[], **options)[0] for p in PROMPTS]
        assert [[c.token_ids for c in r] for r in batch] == [[c.token_ids for c in r] for r in alone]


def test_beams_equal_a_pytorch_beam_search(own):
    module, gen = own
    for prompt in PROMPTS[:2]:
        ids = gen.encode(prompt)
        got = gen.generate_batch([ids], num_beams=3, max_new_tokens=5, stop_token_ids=[])[0][0].token_ids
        assert got == torch_beam_search(module, ids, 3, 5)


def test_perplexity_equals_pytorch(own):
    module, gen = own
    ids = gen.encode(WORDS)[:32]
    assert gen.score(ids).perplexity == pytest.approx(torch_perplexity(module, ids), rel=1e-3)


def test_a_kv_state_speculates_and_goes_back(kv_gpt):
    _, gen = kv_gpt
    prompt = gen.encode("the cat sat on the mat . the cat sat on the")
    plain = gen.generate_batch([prompt], max_new_tokens=12, stop_token_ids=[], speculation="off")[0][0].token_ids
    before = gen.stats.accepted_tokens
    assert gen.generate_batch([prompt], max_new_tokens=12, stop_token_ids=[], speculation="on")[0][0].token_ids == plain
    assert gen.stats.accepted_tokens > before


def test_a_fixed_state_speculates_from_its_snapshots(fading):
    """speculation="on" over a declared fixed state: rejected proposals send the row back to its
    snapshot, and the tokens are a PyTorch loop's carrying the state (auto leaves it off)."""
    module, gen = fading
    prompt = gen.encode("the cat sat on the mat . the dog sat on the log . the cat sat on the")
    expected = carried_greedy(module, prompt, 24)
    before = (gen.stats.proposed_tokens, gen.stats.accepted_tokens)
    assert gen.generate_batch([prompt], max_new_tokens=24, stop_token_ids=[], speculation="on")[0][0].token_ids == expected
    proposed, accepted = gen.stats.proposed_tokens - before[0], gen.stats.accepted_tokens - before[1]
    assert 0 < accepted < proposed
    assert gen.generate_batch([prompt], max_new_tokens=24, stop_token_ids=[], speculation="auto")[0][0].token_ids == expected
    assert gen.stats.proposed_tokens - before[0] == proposed


def test_the_engine_prefills_in_chunks_beside_decoding_rows(own):
    """Three requests on two slots, read three tokens per step: rows of different lengths decode
    together, and each answer is the Generator's for that prompt alone."""
    _, gen = own
    engine = Engine(gen.model, slots=2, ctx_size=32, prefill_chunk=3)
    config = gen.config(max_new_tokens=6, stop_token_ids=[])
    results, done = {}, threading.Event()

    def on_event(prompt):
        def record(event):
            if event.finish_reason is not None:
                results[prompt] = list(requests[prompt].choices[0].tokens)
                if len(results) == len(PROMPTS):
                    done.set()

        return record

    try:
        requests = {p: engine.request(gen.encode(p), config, on_event(p)) for p in PROMPTS}
        for request in requests.values():
            engine.submit(request)
        assert done.wait(60)
    finally:
        engine.close()
    for p in PROMPTS:
        assert results[p] == gen.generate_batch([p], max_new_tokens=6, stop_token_ids=[])[0][0].token_ids


def test_int8_passes_its_gate(kv_gpt, tmp_path):
    module, _ = kv_gpt
    text = tmp_path / "eval.txt"
    text.write_text(WORDS)
    manifest = export_model(module, str(tmp_path / "int8"), tokenizer=VOCAB, precision="int8", eval_text=str(text), progress=lambda line: None)
    assert manifest.quality["passed"] and manifest.quality["increase"] <= manifest.quality["max_increase"]
    assert manifest.quantization["quantized"]["linear"] >= 1
    gen = Generator(str(tmp_path / "int8"), provider="cpu")
    assert gen.manifest.graph.decoding == "declared"
    assert gen.score(gen.encode(WORDS)[:32]).perplexity == pytest.approx(manifest.quality["perplexity"], rel=0.5)


class GrowsAlongAxisOne(nn.Module):
    """A cache [batch, positions, size]: not the [batch, heads, positions, head size] lmrt carries."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, ids, state=None):
        e = self.embedding(ids)
        cache = e if state is None else torch.cat([state, e], dim=1)
        return self.head(e + cache.mean(dim=1, keepdim=True) * 0), cache


class Plain(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, ids):
        return self.head(self.embedding(ids))


WORD_COUNT = len(VOCAB)


@pytest.mark.parametrize(
    "make, declaration, message",
    [
        (FadingMemory, {"memory": ("fixed", (MEMORY + 1,))}, rf"state= declares memory as fixed \[{MEMORY + 1}\] per row, but a traced step gives fixed \[{MEMORY}\]"),
        (FadingMemory, {"memory": ("kv", (4, 12))}, rf"state= declares memory as kv \[4, 12\] per row, but a traced step gives fixed \[{MEMORY}\]"),
        (FadingMemory, {"memory": ("fixed", (MEMORY,)), "more": ("fixed", (2,))}, "state= declares 2 tensors, but the module's state holds 1 \\(memory\\)"),
        (FadingMemory, {"memory": ("growing", (MEMORY,))}, "state= declares 'memory' as .*kind \"kv\" or \"fixed\""),
        (KvGPT, {"k": ("kv", (HEADS, HEAD_SIZE))}, "state= declares 1 tensors, but the module's state holds 4"),
        (KvGPT, {n: ("kv", (HEADS, HEAD_SIZE + 1)) for n in "abcd"}, rf"state= declares a as kv \[{HEADS}, {HEAD_SIZE + 1}\] per row"),
        (GrowsAlongAxisOne, None, r"state state goes from \[2, 3, 8\] to \[2, 5, 8\] in a step of 2 tokens"),
        (Plain, "infer", "state= is given, but the module's forward takes no state"),
    ],
)
def test_a_declaration_that_does_not_fit_is_refused_in_one_line(make, declaration, message, tmp_path):
    with pytest.raises(ExportError, match=message) as e:
        export_model(make(WORD_COUNT), str(tmp_path / "out"), tokenizer=VOCAB, state=declaration, max_length=16, progress=lambda line: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()

