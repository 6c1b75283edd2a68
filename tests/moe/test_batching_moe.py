"""The MoE engine batches too (local_engine/scheduler.py over MoEModel.step_batch): one expert
request per MoE layer per step for the union of the batch's experts, and greedy answers equal to
running the requests one by one."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from local_engine.engine import Engine
from local_engine.scheduler import Scheduler

PROMPTS = ["w5 w17 w99 w3", "w64 w8 w120", "w42 w77 w1 w30 w11", "w9 w9 w100"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_batched_moe_equals_serial_and_reads_the_union_once(tiny_models: dict[str, Any], arch: str) -> None:
    eng = Engine.open(tiny_models[arch].packed["int8"], memory_budget="unlimited", threads=1, prefix_cache_mb=0)
    try:
        serial = []
        for p in PROMPTS:
            g = eng.generate(p, max_tokens=8, temperature=0)
            serial.append("".join(g))
        sched = Scheduler(eng, max_batch=4)
        done = threading.Semaphore(0)
        gens = [eng.generate(p, max_tokens=8, temperature=0) for p in PROMPTS]
        errors: list[BaseException] = []
        for g in gens:
            sched.submit(g, lambda _d: None, lambda e: (errors.append(e) if e else None, done.release()))
        for _ in gens:
            assert done.acquire(timeout=120)
        st = sched.stats()
        sched.close()
        assert not errors
        assert [g.text for g in gens] == serial
        assert st["decode_tokens"] > st["decode_steps"]

        # one batched step: the store is asked once per MoE layer, each expert once
        m = eng.model
        calls: list[list[int]] = []
        real = m.store.request

        def counting(layer: int, experts: list[int], *a: Any, **kw: Any) -> Any:
            calls.append(list(experts))
            return real(layer, experts, *a, **kw)

        m.store.request = counting  # type: ignore[method-assign]
        caches = []
        for p in PROMPTS:
            c = m.new_cache()
            m.forward(torch.tensor(eng.tokenizer.encode(p)), c, last_only=True)
            caches.append(c)
        decode_before = m.run.decode_tokens
        calls.clear()
        logits = m.step_batch(torch.tensor([3, 4, 5, 6]), caches)
        m.store.request = real  # type: ignore[method-assign]
        assert logits.shape[0] == 4 and torch.isfinite(logits).all()
        assert len(calls) == len(m.moe_layers)
        assert all(len(set(c)) == len(c) for c in calls)
        assert m.run.decode_tokens - decode_before == 4
        # each row equals that sequence's own decode step
        for b, c in enumerate(caches):
            c.crop(c.length - 1)
            one = m.forward(torch.tensor([3 + b]), c, last_only=True)[-1]
            assert (one - logits[b]).abs().max().item() < 1e-4
    finally:
        eng.close()


def test_serial_moe_prefill_runs_in_chunks_and_sees_a_cancel_between_them(tiny_models: dict[str, Any]) -> None:
    """A 600-token prompt on the MoE engine, iterated directly (the CLI, a speculative target): one
    engine step per chunk of 256, and should_stop is polled between chunks, not after the prompt."""
    eng = Engine.open(tiny_models["mixtral"].packed["int8"], memory_budget="unlimited", threads=1, prefix_cache_mb=0)
    try:
        assert eng.model.prefill_chunk == 256
        prompt = " ".join(f"w{i % 120 + 3}" for i in range(600))
        steps0 = eng.steps
        gen = eng.generate(prompt, max_tokens=8, temperature=0, should_stop=lambda: eng.steps >= steps0 + 1)
        assert len(gen.prompt_ids) > 2 * 256 + 1
        assert list(gen) == [] and gen.finish_reason == "cancelled"
        assert eng.steps == steps0 + 1 and gen.stats.completion_tokens == 0
        steps0 = eng.steps
        full = eng.generate(prompt, max_tokens=2, temperature=0)
        "".join(full)
        assert full.stats.completion_tokens == 2 and eng.steps == steps0 + 3 + 1  # 3 chunks, 1 decode step
    finally:
        eng.close()
