"""The continuous-batching engine on the tiny model: joins, leaves, per-row adapters and sampling.

Arrival order is made deterministic with the engine's own `on_step` hook (it runs on the engine
thread between steps): a job "arrives" after a chosen step, so no assertion depends on timing.
"""

import asyncio
import copy
import threading
import time

import numpy as np
import pytest
import torch

from p2p.generation import decoding
from p2p.generation.decoding import decode
from p2p.generation.engine import Delta, Engine, EngineBusy, EngineDead, Job
from p2p.generation.sampling import RowSampler, SamplingParams, choose
from p2p.model.adapted import AdaptedModel
from p2p.model.hypernet import load_hypernet

TEXTS = ["Which tag fits this movie: a haunted house at night?", "Hello", "Rate the cafe from 1 to 5.",
         "A quiet review of a very long and winding novel about the sea", "ok", "Tell me a story."]


@pytest.fixture(scope="module")
def setup(tiny, tiny_hypernet):
    model, tok = tiny
    hypernet, _ = load_hypernet(tiny_hypernet)
    adapted = AdaptedModel(copy.deepcopy(model), tok, hypernet.config)
    emb = np.random.default_rng(0).standard_normal((3, 384)).astype(np.float32)
    adapters = hypernet.user_adapters(emb)
    big = [{p: (a * 20, b * 20) for p, (a, b) in ad.items()} for ad in adapters]  # visibly moves the tokens
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    return adapted, big, prompts


class Collector:
    """Records each job's deltas, as the engine emits them on its thread."""

    def __init__(self):
        self.deltas: dict[int, list[Delta]] = {}
        self.done = threading.Event()
        self.expected = 0

    def emit(self, i):
        def put(delta):
            self.deltas.setdefault(i, []).append(delta)
            if sum(1 for ds in self.deltas.values() if ds[-1].finish_reason) == self.expected:
                self.done.set()
        return put

    def tokens(self, i):
        return [d.token for d in self.deltas[i] if d.token is not None]

    def text(self, i):
        return "".join(d.text for d in self.deltas[i])


def run_schedule(adapted, jobs, arrivals, **engine_kw):
    """Submit job i after step arrivals[i] (0: before the first step); return the collector and the engine."""
    out = Collector()
    out.expected = len(jobs)
    pending = sorted(range(len(jobs)), key=lambda i: arrivals[i])
    steps = [0]

    def on_step(rows):
        steps[0] += 1
        while pending and arrivals[pending[0]] <= steps[0]:
            i = pending.pop(0)
            engine.submit(jobs[i], out.emit(i))

    engine = Engine(adapted, on_step=on_step, **engine_kw)
    try:
        while pending and arrivals[pending[0]] == 0:
            i = pending.pop(0)
            engine.submit(jobs[i], out.emit(i))
        assert out.done.wait(120), "engine did not finish"
    finally:
        engine.close()  # joins the engine thread: its counters are final
    return out, engine.snapshot()


@pytest.mark.parametrize("arrivals", [[0, 0, 0, 0, 0, 0], [0, 1, 3, 3, 7, 12], [12, 7, 3, 3, 1, 0]])
def test_continuous_tokens_equal_static_decode_whatever_the_arrival_order(setup, arrivals):
    adapted, adapters, prompts = setup
    users = [adapters[0], None, adapters[1], adapters[0], adapters[2], None]
    budgets = [9, 4, 14, 6, 3, 11]
    jobs = [Job(p, a, SamplingParams(max_tokens=m)) for p, a, m in zip(prompts, users, budgets, strict=True)]
    out, stats = run_schedule(adapted, jobs, arrivals)
    static = decode(adapted, prompts, budgets, users)
    for i in range(len(jobs)):
        assert out.tokens(i) == static.tokens[i], f"job {i} (arrives after step {arrivals[i]})"
        single = decode(adapted, [prompts[i]], [budgets[i]], [users[i]]).tokens[0]
        assert out.tokens(i) == single
        assert out.text(i) == adapted.tokenizer.decode(single, skip_special_tokens=True)
    assert stats["finished"] == len(jobs) and stats["failed"] == 0
    # The adapters matter here: user rows decode differently from the base model.
    assert decode(adapted, [prompts[0]], [9], [None]).tokens[0] != out.tokens(0)


def test_requests_that_arrive_while_a_decode_runs_join_it(setup):
    adapted, adapters, prompts = setup
    long = Job(prompts[0], adapters[0], SamplingParams(max_tokens=40))
    short = [Job(prompts[i % len(prompts)], adapters[i % 3], SamplingParams(max_tokens=4)) for i in range(7)]
    out, stats = run_schedule(adapted, [long, *short], [0] + [2] * 7)
    # After step 2 the seven join the running row: 8 rows decode together, then they leave.
    assert stats["rows_per_step"]["8"] >= 1
    assert max(d.batch_rows for d in out.deltas[0]) == 8
    assert all(max(d.batch_rows for d in out.deltas[i]) == 8 for i in range(1, 8))
    assert stats["rows_per_step"]["1"] >= 40 - 2 - 4  # the long row alone before and after them


def test_static_batching_makes_late_requests_wait(setup):
    adapted, adapters, prompts = setup
    long = Job(prompts[0], adapters[0], SamplingParams(max_tokens=20))
    short = [Job(prompts[1], None, SamplingParams(max_tokens=3)) for _ in range(3)]
    out, stats = run_schedule(adapted, [long, *short], [0, 2, 2, 2], batching="static")
    assert max(d.batch_rows for d in out.deltas[0]) == 1  # nobody joined the running batch
    assert {d.batch_rows for i in (1, 2, 3) for d in out.deltas[i]} == {3}  # they ran together, afterwards
    assert out.tokens(0) == decode(adapted, [prompts[0]], [20], [adapters[0]]).tokens[0]


def test_per_request_seeds_are_honoured_inside_a_batch(setup):
    adapted, adapters, prompts = setup
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    alone, _ = run_schedule(adapted, [Job(prompts[2], None, sampled)], [0])
    others = [Job(prompts[i], adapters[i % 3], SamplingParams(max_tokens=12, temperature=1.0, seed=i)) for i in range(4)]
    mixed, _ = run_schedule(adapted, [*others, Job(prompts[2], None, sampled)], [0, 0, 1, 2, 3])
    assert mixed.tokens(4) == alone.tokens(0)
    other_seed, _ = run_schedule(adapted, [Job(prompts[2], None, SamplingParams(12, 1.0, seed=99))], [0])
    assert other_seed.tokens(0) != alone.tokens(0)


def test_stop_strings_cut_the_text_and_stream_pieces_add_up(setup):
    adapted, _, prompts = setup
    tok = adapted.tokenizer
    greedy = decode(adapted, [prompts[3]], [24], None).tokens[0]
    full = tok.decode(greedy, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    out, _ = run_schedule(adapted, [Job(prompts[3], None, SamplingParams(max_tokens=24, stop=("zzzz", stop)))], [0])
    assert out.text(0) == full[: full.index(stop)]
    assert out.deltas[0][-1].finish_reason == "stop"
    assert stop not in "".join(d.text for d in out.deltas[0])


def test_logprobs_report_the_raw_distribution(setup):
    adapted, adapters, prompts = setup
    out, _ = run_schedule(adapted, [Job(prompts[0], adapters[1], SamplingParams(max_tokens=5, logprobs=3))], [0])
    choices = [d.choice for d in out.deltas[0] if d.token is not None]
    assert len(choices) == 5
    for c in choices:
        assert len(c.top) == 3 and c.top[0][0] == c.token  # greedy: the chosen token is the most likely
        assert c.logprob == pytest.approx(c.top[0][1]) and c.logprob <= 0
        assert c.top[0][1] >= c.top[1][1] >= c.top[2][1]


def test_cancelled_rows_leave_at_the_next_step(setup):
    adapted, _, prompts = setup
    out = Collector()
    started = threading.Event()
    engine = Engine(adapted, on_step=lambda rows: started.set())
    try:
        seq = engine.submit(Job(prompts[0], None, SamplingParams(max_tokens=500)), out.emit(0))
        assert started.wait(60)
        engine.cancel(seq)
        for _ in range(200):
            if engine.snapshot()["running"] == 0:
                break
            threading.Event().wait(0.05)
        stats = engine.snapshot()
        assert stats["running"] == 0 and stats["cancelled"] == 1
        assert len(out.tokens(0)) < 500
    finally:
        engine.close()


def test_async_stream_yields_every_job_and_bad_jobs_are_refused(setup):
    adapted, adapters, prompts = setup
    engine = Engine(adapted)

    async def collect():
        got = {}
        async for i, delta in engine.stream([Job(prompts[1], None, SamplingParams(max_tokens=3)),
                                              Job(prompts[4], adapters[0], SamplingParams(max_tokens=5))]):
            got.setdefault(i, []).append(delta)
        return got

    try:
        got = asyncio.run(collect())
        assert [len([d for d in got[i] if d.token is not None]) for i in (0, 1)] == [3, 5]
        with pytest.raises(ValueError, match="empty"):
            engine.submit(Job([], None, SamplingParams()), lambda d: None)
        with pytest.raises(ValueError, match="vocabulary"):
            engine.submit(Job([10**9], None, SamplingParams()), lambda d: None)
    finally:
        engine.close()


def test_a_join_that_fails_half_way_leaves_the_running_rows_intact(setup, monkeypatch):
    """Out of memory while merging the newcomers' KV cache, after some layers: the running row decodes on."""
    adapted, adapters, prompts = setup
    pad_left, calls = decoding._pad_left, [0]

    def failing_pad_left(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # layer 0's keys and values are done; layer 1's keys fail
            raise torch.OutOfMemoryError("injected")
        return pad_left(*args, **kwargs)

    merge = decoding._merge

    def counted_merge(*args):
        calls[0] = 0
        return merge(*args)

    monkeypatch.setattr(decoding, "_pad_left", failing_pad_left)
    monkeypatch.setattr(decoding, "_merge", counted_merge)
    running = Job(prompts[0], adapters[0], SamplingParams(max_tokens=12))
    newcomer = Job(prompts[2], adapters[1], SamplingParams(max_tokens=4))
    out, stats = run_schedule(adapted, [running, newcomer], [0, 2])
    monkeypatch.setattr(decoding, "_pad_left", pad_left)
    assert out.deltas[1][-1].finish_reason == "error" and stats["failed"] == 1
    assert out.tokens(0) == decode(adapted, [prompts[0]], [12], [adapters[0]]).tokens[0]


def test_a_dead_loop_fails_its_callers_and_a_stuck_or_full_one_says_so(setup, monkeypatch):
    adapted, adapters, prompts = setup
    engine = Engine(adapted)
    engine.check()
    monkeypatch.setattr(engine, "_drop_cancelled", lambda: (_ for _ in ()).throw(MemoryError("injected")))
    out = Collector()
    out.expected = 1
    engine.submit(Job(prompts[0], None, SamplingParams(max_tokens=4)), out.emit(0))
    assert out.done.wait(60), "the caller of a dead loop waited forever"
    assert out.deltas[0][-1].finish_reason == "error"
    with pytest.raises(EngineDead, match="MemoryError"):
        engine.check()
    with pytest.raises(EngineDead):
        engine.submit(Job(prompts[0], None, SamplingParams(max_tokens=4)), out.emit(1))
    engine.close()
    # Stuck: one step running past stuck_s fails the check; a full queue refuses the next sequence.
    release, inside = threading.Event(), threading.Event()

    def hold(rows):
        inside.set()
        release.wait(60)

    engine = Engine(adapted, on_step=hold, stuck_s=0.2, max_waiting=2)
    try:
        out = Collector()
        out.expected = 3
        engine.submit(Job(prompts[0], None, SamplingParams(max_tokens=2)), out.emit(0))
        assert inside.wait(60)
        time.sleep(0.4)  # past stuck_s inside one step
        with pytest.raises(EngineDead, match="stuck_s"):
            engine.check()
        for i in (1, 2):
            engine.submit(Job(prompts[1], None, SamplingParams(max_tokens=2)), out.emit(i))
        with pytest.raises(EngineBusy, match="limit is 2"):
            engine.submit(Job(prompts[1], None, SamplingParams(max_tokens=2)), out.emit(3))
        engine.on_step = None
        release.set()
        assert out.done.wait(60)
        engine.check()  # healthy again once the step ends
    finally:
        release.set()
        engine.close()


def test_sampler_penalties_top_p_and_validation():
    logits = torch.tensor([[0.0, 3.0, 2.5, -1.0]])
    plain = RowSampler(SamplingParams())
    assert choose(logits, [plain])[0].token == 1
    penalized = RowSampler(SamplingParams(presence_penalty=1.0))
    penalized.observe(1)
    assert choose(logits, [penalized])[0].token == 2  # 3.0 - 1.0 < 2.5
    frequent = RowSampler(SamplingParams(frequency_penalty=0.3))
    frequent.observe(1)
    assert choose(logits, [frequent])[0].token == 1  # 3.0 - 0.3 > 2.5
    frequent.observe(1)
    assert choose(logits, [frequent])[0].token == 2  # 3.0 - 0.6 < 2.5
    nucleus = [RowSampler(SamplingParams(temperature=5.0, top_p=1e-6, seed=s)) for s in range(20)]
    assert {c.token for c in choose(logits.repeat(20, 1), nucleus)} == {1}
    # A top_p that float32 rounds to 0 (schemathesis found 5e-324: a 503) is greedy, not an empty distribution.
    tiniest = [RowSampler(SamplingParams(temperature=1.0, top_p=5e-324, seed=s)) for s in range(5)]
    assert {c.token for c in choose(logits.repeat(5, 1), tiniest)} == {1}
    wide = [RowSampler(SamplingParams(temperature=5.0, seed=s)) for s in range(40)]
    assert len({c.token for c in choose(logits.repeat(40, 1), wide)}) > 1
    for bad in (dict(temperature=float("nan")), dict(top_p=0.0), dict(seed=2**64), dict(max_tokens=0),
                dict(presence_penalty=3.0), dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
