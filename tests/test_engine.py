"""The decode loop's slots, the scheduler and the Engine: whatever else runs, each request gets what
it would get alone; rows are reused, freed and moved without touching what they hold."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lmrt import runtime
from lmrt.runtime import Engine, QueueFullError
from lmrt.runtime.state_store import StateStore

PROMPTS = [
    "The capital of France is",
    "北京是中国的首都。东京是日本的首都。我们喜欢在晚上喝茶。",
    "Once upon a time there was a quick brown fox who jumped over the lazy dog again",
    "Emoji 🚀",
    "A runtime reads the manifest, loads the graph, and decodes one token at a time with a cache. " * 2,
]
SETTINGS = [
    dict(max_new_tokens=24),
    dict(max_new_tokens=30, temperature=0.9, top_k=40, seed=5),
    dict(max_new_tokens=20, repetition_penalty=1.3, presence_penalty=0.5),
    dict(max_new_tokens=16, temperature=1.1, min_p=0.05, seed=9, num_return_sequences=2),
]


@pytest.fixture(scope="module")
def llama(tiny_models):
    return runtime.Generator(tiny_models["llama"][2], provider="cpu")


def collect(engine, ids, config, logprobs=None):
    """Submit and wait; returns (texts per choice, request)."""
    done = threading.Event()
    texts = [""] * config.num_return_sequences

    def on_event(event):
        texts[event.choice] += event.text
        if request.done or all(c.finish_reason for c in request.choices):
            done.set()

    request = engine.request(ids, config, on_event, logprobs)
    engine.submit(request)
    assert done.wait(60)
    return texts, request


def alone(gen, prompt, **settings):
    return [(c.text, c.token_ids, c.finish_reason) for c in gen.generate_batch([prompt], **settings)[0]]


@pytest.mark.parametrize("chunk", [4, 256])
def test_engine_requests_at_once_equal_each_alone(llama, chunk):
    """Every prompt x setting submitted together to 3 slots (so some wait, some are prefilled in
    chunks while others decode, and rows move as requests finish) gives the Generator's result."""
    engine = Engine(llama.model, slots=3, ctx_size=128, prefill_chunk=chunk)
    try:
        jobs = [(p, s) for p in PROMPTS for s in SETTINGS]
        results = [None] * len(jobs)
        threads = []
        for i, (prompt, settings) in enumerate(jobs):
            def run(i=i, prompt=prompt, settings=settings):
                config = llama.config(**settings)
                texts, request = collect(engine, llama.encode(prompt), config)
                results[i] = [(t, c.tokens, c.finish_reason) for t, c in zip(texts, request.choices)]
            threads.append(threading.Thread(target=run))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for (prompt, settings), got in zip(jobs, results):
            assert got == alone(llama, prompt, **settings), (prompt, settings)
        assert engine.status().stats.requests_finished == len(jobs)
        assert engine.status().slots_in_use == 0
    finally:
        engine.close()


def test_engine_rows_speculate_together_and_each_gets_its_answer_alone(llama):
    """Greedy requests with speculation "on" in 3 slots (prompts that repeat themselves and ones that
    do not, prefilled in chunks beside rows that decode): rows check their proposals beside the
    batch's steps, roll back what each rejected, and every answer is the one without speculation."""
    from test_speculation import PLAIN, REPEATING

    engine = Engine(llama.model, slots=3, ctx_size=128, prefill_chunk=8)
    try:
        prompts = REPEATING * 2 + PLAIN
        config = llama.config(max_new_tokens=30, speculation="on", stop_token_ids=[])
        results = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, collect(engine, llama.encode(prompts[i]), config)))
                   for i in range(len(prompts))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for prompt, (texts, request) in zip(prompts, results):
            without = alone(llama, prompt, max_new_tokens=30, speculation="off", stop_token_ids=[])[0]
            assert (texts[0], request.choices[0].tokens) == without[:2]
        stats = engine.status().stats
        assert stats.accepted_tokens > 0 and stats.decode_steps < stats.generated_tokens
    finally:
        engine.close()


def test_prefix_reuse_gives_the_same_answer_and_counts_cached_tokens(llama):
    engine = Engine(llama.model, slots=2, ctx_size=128, prefill_chunk=8)
    try:
        first = llama.encode(PROMPTS[2])
        texts, request = collect(engine, first, llama.config(max_new_tokens=10))
        assert request.cached_tokens == 0
        history = first + request.choices[0].tokens + llama.encode(" and then the fox")
        texts2, request2 = collect(engine, history, llama.config(max_new_tokens=12))
        # the second turn starts with everything the first one left in its row
        assert request2.cached_tokens == len(first) + len(request.choices[0].tokens) - 1
        assert [(texts2[0], request2.choices[0].tokens)] == [(t, ids) for t, ids, _ in alone(llama, history, max_new_tokens=12)]
        assert engine.status().stats.cached_prompt_tokens == request2.cached_tokens
    finally:
        engine.close()


def test_cancel_frees_the_slot_and_others_go_on(llama):
    engine = Engine(llama.model, slots=2, ctx_size=128)
    try:
        release = threading.Event()

        def hold(ids, logits):  # keeps its request running until released
            release.wait(10)
            return logits

        config = llama.config(max_new_tokens=100, stop_token_ids=[], logits_processors=[hold])
        held = engine.submit(engine.request(llama.encode("Small"), config, lambda e: None))
        deadline = time.time() + 10
        while engine.status().slots_in_use < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.status().slots_in_use == 1
        engine.cancel(held)
        release.set()
        deadline = time.time() + 10
        while not held.done and time.time() < deadline:
            time.sleep(0.01)
        assert held.done and held.choices[0].finish_reason == "cancelled"
        assert len(held.choices[0].tokens) < 100
        assert engine.status().slots_in_use == 0
        texts, request = collect(engine, llama.encode(PROMPTS[0]), llama.config(max_new_tokens=20))
        assert [(texts[0], request.choices[0].tokens)] == [(t, ids) for t, ids, _ in alone(llama, PROMPTS[0], max_new_tokens=20)]
    finally:
        engine.close()


def test_full_queue_refuses_at_once_and_drops_nothing(llama):
    engine = Engine(llama.model, slots=1, ctx_size=128, max_queue=1)
    try:
        release = threading.Event()

        def hold(ids, logits):
            release.wait(10)
            return logits

        config = llama.config(max_new_tokens=8, stop_token_ids=[])
        running = engine.submit(engine.request(llama.encode("Small"), config.replace(logits_processors=(hold,)), lambda e: None))
        waiting = engine.submit(engine.request(llama.encode("Small"), config, lambda e: None))
        with pytest.raises(QueueFullError, match="busy"):
            engine.submit(engine.request(llama.encode("Small"), config, lambda e: None))
        release.set()
        deadline = time.time() + 10
        while not (running.done and waiting.done) and time.time() < deadline:
            time.sleep(0.01)
        assert [len(r.choices[0].tokens) for r in (running, waiting)] == [8, 8]
    finally:
        engine.close()


def test_a_failing_processor_ends_only_its_request(llama):
    engine = Engine(llama.model, slots=2, ctx_size=128)
    try:
        def broken(ids, logits):
            raise RuntimeError("boom")

        failed = engine.submit(engine.request(llama.encode("Small"), llama.config(max_new_tokens=8, logits_processors=[broken]), lambda e: None))
        texts, request = collect(engine, llama.encode(PROMPTS[0]), llama.config(max_new_tokens=12))
        deadline = time.time() + 10
        while not failed.done and time.time() < deadline:
            time.sleep(0.01)
        assert isinstance(failed.error, RuntimeError) and failed.choices[0].finish_reason == "error"
        assert [(texts[0], request.choices[0].tokens)] == [(t, ids) for t, ids, _ in alone(llama, PROMPTS[0], max_new_tokens=12)]
    finally:
        engine.close()


def test_engine_refuses_what_a_slot_cannot_hold(llama):
    engine = Engine(llama.model, slots=2, ctx_size=64)
    try:
        with pytest.raises(ValueError, match="more than a slot holds"):
            engine.request(llama.encode("Small"), llama.config(max_new_tokens=64), lambda e: None)
        with pytest.raises(ValueError, match="a slot holds 64"):
            engine.request(list(range(64)), llama.config(max_new_tokens=1), lambda e: None)
        with pytest.raises(ValueError, match="num_return_sequences 3 is more than"):
            engine.request([1, 2], llama.config(max_new_tokens=4, temperature=1.0, num_return_sequences=3), lambda e: None)
    finally:
        engine.close()


def test_logprobs_are_the_models_own(llama):
    """Each token's reported log-probability is what scoring the finished text gives."""
    prompt = llama.encode(PROMPTS[0])
    got = llama.generate_batch([prompt], logprobs=3, max_new_tokens=12, temperature=0.8, seed=2)[0][0]
    scored = llama.score(prompt + got.token_ids)
    expected = scored.logprobs[len(prompt) - 1 :]
    np.testing.assert_allclose([lp.logprob for lp in got.logprobs], expected, atol=2e-4)
    assert [lp.token for lp in got.logprobs] == got.token_ids
    for lp in got.logprobs:
        assert len(lp.top) == 3 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.top[0][1] >= lp.logprob - 1e-9


# --- the Generator shared between threads and streams ------------------------------------------


def test_generator_from_many_threads_gives_each_its_own_answer(llama):
    expected = {p: llama.generate(p, max_new_tokens=20) for p in PROMPTS}
    got: dict[str, str] = {}
    errors = []

    def run(prompt):
        try:
            got[prompt] = llama.generate(prompt, max_new_tokens=20)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == expected


def test_interleaved_streams_do_not_mix(llama):
    a_alone = llama.generate(PROMPTS[0], max_new_tokens=20, stop_token_ids=[])
    b_alone = llama.generate(PROMPTS[3], max_new_tokens=25, temperature=0.9, seed=1, stop_token_ids=[])
    a = llama.stream(PROMPTS[0], max_new_tokens=20, stop_token_ids=[])
    b = llama.stream(PROMPTS[3], max_new_tokens=25, temperature=0.9, seed=1, stop_token_ids=[])
    pieces_a, pieces_b = [], []
    for pa, pb in zip(a, b):  # read alternately
        pieces_a.append(pa)
        pieces_b.append(pb)
    pieces_a += list(a)
    pieces_b += list(b)
    assert "".join(pieces_a) == a_alone and "".join(pieces_b) == b_alone


def test_an_abandoned_stream_stops_generating(llama):
    stream = llama.stream(PROMPTS[0], max_new_tokens=100, stop_token_ids=[])
    next(stream)
    stream.close()
    assert llama.generate(PROMPTS[1], max_new_tokens=10) == alone(llama, PROMPTS[1], max_new_tokens=10)[0][0]
    assert not llama._loop.busy


# --- the cache's rows ---------------------------------------------------------------------------


def test_cache_rows_move_without_changing_what_they_hold(llama):
    arch, io = llama.manifest.architecture, llama.manifest.graph.io
    cache = StateStore(arch, io)
    cache.reset(4, 16, active=0)
    rng = np.random.default_rng(0)
    owners = ["a", "b", "c"]
    contents = {}
    for o in owners:
        assert cache.claim(o, np.arange(5)) == 0
        row = cache.row_of(o)
        n = int(rng.integers(2, 12))
        ids = rng.integers(0, 100, size=(1, n))
        for buf in cache.buffers.host_arrays():
            buf[row, :, :n] = rng.normal(size=buf[row, :, :n].shape)
        cache.advance(row, ids)
        contents[o] = ([buf[row, :, :n].copy() for buf in cache.buffers.host_arrays()], ids[0].tolist())
        cache.activate(o)
    assert cache.owners() == owners and cache.active == 3
    cache.release("a")  # "c" moves into a's row; a's row keeps its positions for reuse
    assert cache.active == 2 and set(cache.owners()) == {"b", "c"}

    def check(owner):
        row = cache.row_of(owner)
        bufs, ids = contents[owner]
        assert cache.tokens(row).tolist() == ids
        for buf, before in zip(cache.buffers.host_arrays(), bufs):
            np.testing.assert_array_equal(buf[row, :, : len(ids)], before)

    for o in ("b", "c"):
        check(o)
    # a new owner whose ids start like a's gets a's old row, truncated to the shared prefix
    a_ids = contents["a"][1]
    shared = cache.claim("d", np.array(a_ids[:3] + [999, 998]))
    assert shared == 3
    row = cache.row_of("d")
    np.testing.assert_array_equal(cache.buffers.host_arrays()[0][row, :, :3], contents["a"][0][0][:, :3])
    cache.truncate(row, 1)
    assert cache.lengths[row] == 1 and cache.tokens(row).tolist() == a_ids[:1]
    with pytest.raises(ValueError):
        cache.truncate(row, 2)


def test_a_generator_and_an_engine_share_one_loaded_model(llama):
    """Each driver has its own state store and IO binding: a Generator generating on this thread
    while an Engine over the same LoadedModel serves other requests gives both what they give alone."""
    prompts = PROMPTS[:3]
    expected = {p: alone(llama, p, max_new_tokens=24) for p in prompts}
    direct = runtime.Generator(llama.model)
    assert direct.model is llama.model
    engine = Engine(llama.model, slots=2, ctx_size=128)
    try:
        served = {}

        def serve(prompt):
            texts, request = collect(engine, llama.encode(prompt), llama.config(max_new_tokens=24))
            served[prompt] = [(texts[0], request.choices[0].tokens, request.choices[0].finish_reason)]

        threads = [threading.Thread(target=serve, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        meanwhile = {p: [(c.text, c.token_ids, c.finish_reason) for c in direct.generate_batch([p], max_new_tokens=24)[0]] for p in prompts}
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "an engine request did not finish"
        assert served == expected
        assert meanwhile == expected
    finally:
        engine.close()


def test_beams_and_scoring_borrow_rows_of_the_generators_own_store(llama):
    """Beam search and scoring run in rows lent by the Generator's one store, which afterwards is
    as it was: same shape, and the row a finished generation left keeps its tokens for reuse."""
    gen = runtime.Generator(llama.model)
    gen.generate(PROMPTS[0], max_new_tokens=8)
    store = gen._loop.store
    before = (store.rows, store.capacity, store.tokens(0).tolist())
    assert len(before[2]) > 0
    beams = gen.generate_batch([PROMPTS[2]], num_beams=3, max_new_tokens=6)
    assert beams == llama.generate_batch([PROMPTS[2]], num_beams=3, max_new_tokens=6)
    assert gen.score(PROMPTS[4]).perplexity == llama.score(PROMPTS[4]).perplexity
    assert gen._loop.store is store
    assert (store.rows, store.capacity, store.tokens(0).tolist()) == before


def test_engine_scores_on_its_thread_while_it_decodes(llama):
    """``Engine.score`` runs between decode steps: scores (with the top alternatives) equal
    ``score_ids`` alone, and the generation running meanwhile equals the Generator's."""
    from lmrt.runtime.sampling import log_softmax
    from lmrt.runtime.scoring import score_ids

    engine = Engine(llama.model, slots=2, ctx_size=128)
    try:
        config = llama.config(max_new_tokens=40)
        ids = llama.encode(PROMPTS[2])
        finished = threading.Event()
        texts = [""]

        def on_event(event):
            texts[0] += event.text
            if event.finish_reason:
                finished.set()

        engine.submit(engine.request(llama.encode(PROMPTS[0]), config, on_event))
        futures = [engine.score(ids, top=3) for _ in range(3)]
        scores = [f.result(60) for f in futures]
        assert finished.wait(60)
        assert texts[0] == llama.generate(PROMPTS[0], max_new_tokens=40)
        alone = score_ids(llama.model, ids, top=3)
        logp = log_softmax(llama.model.sequence_logits(ids)[:-1])
        for score in scores:
            np.testing.assert_allclose(score.logprobs, alone.logprobs, atol=1e-5)
            assert [[t for t, _ in best] for best in score.top] == [[t for t, _ in best] for best in alone.top]
            assert all(len(best) == 3 and best[0][0] == a for best, a in zip(score.top, score.argmax))
            expected_ranks = (logp > logp[np.arange(len(ids) - 1), ids[1:]][:, None]).sum(-1) + 1
            assert score.ranks.tolist() == expected_ranks.tolist()
        assert engine.status().slots_in_use == 0
        assert engine.score(ids[:1]).result(60).num_scored == 0
        with pytest.raises(ValueError, match="positions"):
            engine.score(list(range(200)))
    finally:
        engine.close()
