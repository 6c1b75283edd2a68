"""Continuous batching (local_engine/scheduler.py) on the built-in model: outputs equal serial
runs, per-request sampling / stops / grammar inside one batch, fair bounded admission, and
cancellation seen within one step, between prefill chunks too (counted in engine steps, not time).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from local_engine.engine import Engine
from local_engine.scheduler import QueueFull, Scheduler

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "What is 2+2?", "Who wrote Hamlet?", "Give me a word that rhymes with cat.",
             "Why is the sky blue?", "Count from one to five."]
PERSON = {"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def eng(smol_path) -> Engine:
    # its own engine: no prefix cache, so serial and batched runs prefill the same tokens
    return Engine.open(smol_path, prefix_cache_mb=0)


class _Waiter:
    """Collects one request's deltas and end from the engine thread."""

    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def on_done(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()

    def wait(self) -> None:
        assert self.done.wait(300), "the scheduler never finished the request"


def _submit(s: Scheduler, gen: Any) -> _Waiter:
    w = _Waiter()
    s.submit(gen, w.deltas.append, w.on_done)
    return w


def _requests(eng: Engine) -> list[dict[str, Any]]:
    """8 requests, each with its own options: greedy, a stop string, a JSON schema, top-k sampling."""
    reqs: list[dict[str, Any]] = [{"messages": [{"role": "user", "content": q}], "max_tokens": 24}
                                  for q in QUESTIONS]
    reqs[1]["stop"] = [","]
    reqs[2]["response_format"] = PERSON
    reqs[2]["messages"] = [{"role": "user", "content": "Alice is 30. Give her as JSON."}]
    reqs[3].update(temperature=0.8, top_k=20, seed=7)
    reqs[5]["max_tokens"] = 5
    return reqs


def test_eight_concurrent_equal_serial(eng: Engine) -> None:
    reqs = _requests(eng)
    serial = []
    for r in reqs:
        g = eng.chat(**r)
        serial.append(("".join(g), g.finish_reason, g.usage))
    s = Scheduler(eng, max_batch=8)
    try:
        gens = [eng.chat(**r) for r in reqs]
        waiters = [_submit(s, g) for g in gens]
        for w in waiters:
            w.wait()
        st = s.stats()
    finally:
        s.close()
    for (text, reason, usage), g, w in zip(serial, gens, waiters, strict=True):
        assert w.error is None
        assert (g.text, g.finish_reason, g.usage) == (text, reason, usage)
        assert "".join(w.deltas) == g.text
    assert gens[1].finish_reason == "stop" and "," not in gens[1].text and gens[1].stop_sequence == ","
    assert json.loads(gens[2].text).keys() == {"name", "age"}
    assert gens[5].usage["completion_tokens"] == 5 and gens[5].finish_reason == "length"
    # they really shared steps: more tokens than decode steps
    assert st["decode_tokens"] > st["decode_steps"] and st["mean_batch_size"] > 2
    assert st["ttft"]["count"] == 8 and sum(st["ttft"]["counts"]) == 8
    assert st["admitted"] == st["finished"] == 8 and st["active_sequences"] == 0


def test_cancel_removes_a_sequence_within_one_step(eng: Engine) -> None:
    s = Scheduler(eng, max_batch=4)
    flag = threading.Event()
    try:
        victim = eng.chat([{"role": "user", "content": "Write a very long story about a dragon."}],
                          max_tokens=400, should_stop=flag.is_set)
        other = eng.chat([{"role": "user", "content": "Write a long poem about rain."}], max_tokens=60)
        wv, wo = _submit(s, victim), _submit(s, other)
        while victim.stats.completion_tokens < 5 and not wv.done.is_set():
            threading.Event().wait(0.005)
        flag.set()
        at_cancel = victim.stats.completion_tokens
        wv.wait()
        wo.wait()
    finally:
        s.close()
    assert victim.finish_reason == "cancelled"
    # the token in flight when the flag was set, at most
    assert victim.stats.completion_tokens <= at_cancel + 1
    assert other.finish_reason in ("stop", "length") and other.stats.completion_tokens > 0


def test_cancel_is_seen_between_prefill_chunks(eng: Engine) -> None:
    s = Scheduler(eng, max_batch=2, prefill_chunk=64)
    long = " ".join(f"item {i} is a thing" for i in range(120))  # ~600 tokens: 10 chunks of 64
    try:
        steps0 = eng.steps
        gen = eng.chat([{"role": "user", "content": long}], max_tokens=8,
                       should_stop=lambda: eng.steps >= steps0 + 2)
        assert len(gen.prompt_ids) > 8 * 64
        w = _submit(s, gen)
        w.wait()
        st = s.stats()
    finally:
        s.close()
    assert gen.finish_reason == "cancelled" and gen.stats.completion_tokens == 0 and w.deltas == []
    assert st["prefill_chunks"] <= 3  # not the whole prompt


def test_fifo_admission(eng: Engine) -> None:
    s = Scheduler(eng, max_batch=1, max_waiting=3)
    order: list[int] = []
    try:
        gens = [eng.chat([{"role": "user", "content": q}], max_tokens=4) for q in QUESTIONS[:3]]
        waiters = []
        for i, g in enumerate(gens):
            w = _Waiter()
            s.submit(g, w.deltas.append, lambda e, i=i, w=w: (order.append(i), w.on_done(e)))
            waiters.append(w)
        for w in waiters:
            w.wait()
    finally:
        s.close()
    assert order == [0, 1, 2]


def test_queue_full_is_refused_at_once(eng: Engine) -> None:
    s = Scheduler(eng, max_batch=1, max_waiting=0)
    try:
        with eng.lock:  # the engine thread cannot finish the first request meanwhile
            w = _submit(s, eng.chat([{"role": "user", "content": "Hi"}], max_tokens=4))
            with pytest.raises(QueueFull):
                s.submit(eng.chat([{"role": "user", "content": "Hi"}], max_tokens=2), print, print)
        w.wait()
        assert s.stats()["rejected_queue_full"] == 1
    finally:
        s.close()


def test_prompt_past_the_context_is_an_engine_error(eng: Engine) -> None:
    s = Scheduler(eng)
    try:
        gen = eng.generate("hi " * (eng.max_seq + 10), max_tokens=4)
        w = _submit(s, gen)
        w.wait()
    finally:
        s.close()
    assert w.error is not None and "does not fit the context" in str(w.error)


@pytest.mark.parametrize("n", [257, 513])
def test_long_prompt_chunks_as_the_serial_path(eng: Engine, n: int) -> None:
    """256-token chunks, and a one-token remainder runs with the chunk before (the model's decode
    step would compute it otherwise): logits and so the answer are the serial run's."""
    from local_engine.generation import Generation
    from local_engine.sampling import SamplingParams

    ids = eng.tokenizer.encode(" ".join(f"w{i}" for i in range(400)), add_special=True)[:n]
    serial = Generation(eng, ids, SamplingParams(max_tokens=6), None)
    text = "".join(serial)
    s = Scheduler(eng)
    try:
        gen = Generation(eng, ids, SamplingParams(max_tokens=6), None)
        _submit(s, gen).wait()
        chunks = s.stats()["prefill_chunks"]
    finally:
        s.close()
    assert gen.text == text and gen.finish_reason == serial.finish_reason
    assert chunks == (n - 1) // 256


def test_serial_run_sees_a_cancel_between_prefill_chunks(eng: Engine) -> None:
    """Engine.chat iterated directly (a speculative target, the CLI): the same chunks, one engine
    step each, and should_stop polled between them."""
    long = " ".join(f"item {i} is a thing" for i in range(120))  # ~600 tokens: 3 chunks of 256
    steps0 = eng.steps
    gen = eng.chat([{"role": "user", "content": long}], max_tokens=8, should_stop=lambda: eng.steps >= steps0 + 1)
    assert len(gen.prompt_ids) > 2 * 256 + 1
    assert list(gen) == [] and gen.finish_reason == "cancelled"
    assert eng.steps == steps0 + 1 and gen.stats.completion_tokens == 0
