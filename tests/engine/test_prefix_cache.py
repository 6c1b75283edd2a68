"""The prefix cache: a conversation's next turn prefills only its new tokens, with the same logits
and the same greedy answer as a fresh run; LRU eviction under the byte budget."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from local_engine.engine import Engine
from local_engine.models.layers import ATTN_GROUP
from local_engine.prefix_cache import PrefixCache, common_prefix

SYSTEM = "You are a travel assistant. Answer in one short sentence. " * 8
TURN1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "required": ["city"], "properties": {
               "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
# A hit runs the new rows through the very calls a fresh run makes (prefix_cache.py): the logits
# are compared bitwise, not within a tolerance.


@pytest.fixture()
def eng(smol: Engine) -> Engine:
    # the session's model, with a prefix cache of its own (other tests share `smol`)
    return Engine(smol.model, smol.tokenizer, source=smol.source, format=smol.format)


def _no_cache(eng: Engine) -> Engine:
    return Engine(eng.model, eng.tokenizer, prefix_cache_mb=0)


def _second_turn(eng: Engine) -> list[dict[str, Any]]:
    first = "".join(eng.chat(TURN1, max_tokens=12))
    return [*TURN1, {"role": "assistant", "content": first}, {"role": "user", "content": "And of Spain?"}]


def _ids(eng: Engine, messages: list[dict[str, Any]]) -> list[int]:
    return eng.tokenizer.encode(eng.render_chat(messages))


def _reusable(shared: int, prompt: int) -> int:
    """What a hit reuses: the shared prefix, leaving two tokens to run, down to a multiple of ATTN_GROUP."""
    n = min(shared, prompt - 2)
    return n - n % ATTN_GROUP


def _hit_logits(eng: Engine, ids: list[int]) -> tuple[torch.Tensor, int]:
    """Logits of the rows after what the prefix cache lends for ``ids`` (and that length)."""
    with torch.inference_mode():
        cache, n = eng.prefix_cache.take(ids, eng.model.new_cache)
        return eng.model.forward(torch.tensor(ids[n:]), cache), n


def test_second_turn_reuses_the_first_and_matches_a_fresh_run(eng: Engine) -> None:
    msgs = _second_turn(eng)
    turn1, turn2 = _ids(eng, TURN1), _ids(eng, msgs)
    # what the first turn left: its prompt (the answer's K/V came from decode steps: not kept)
    (entry,) = eng.prefix_cache._entries.values()
    assert entry.tokens.tolist() == turn1 and turn2[:len(turn1)] == turn1
    want_n = _reusable(len(turn1), len(turn2))
    assert want_n > len(turn1) - ATTN_GROUP
    gen = eng.chat(msgs, max_tokens=12)
    cached = "".join(gen)
    assert gen.stats.cached_tokens == want_n
    assert eng.prefix_cache.stats()["prefix_cache_reused_tokens"] == want_n
    fresh = _no_cache(eng).chat(msgs, max_tokens=12)
    assert "".join(fresh) == cached and fresh.stats.cached_tokens == 0  # greedy: identical
    # logits of the cached path (the K/V kept by the second turn, only the new tokens run) vs fresh
    turn3 = [*msgs, {"role": "assistant", "content": cached}, {"role": "user", "content": "Thanks!"}]
    ids = _ids(eng, turn3)
    got, n = _hit_logits(eng, ids)
    assert n == _reusable(len(turn2), len(ids)) and n > 0
    assert torch.equal(got, eng.logits(ids)[n:])


def test_the_same_request_three_times_gives_the_same_answer(eng: Engine) -> None:
    """A repeated prompt is served from its own K/V but still prefills its last rows: before, the
    last token ran through the fused decode step and "Say hello." with a tool flipped a near-tie."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}]
    runs = [eng.chat(msgs, tools=[WEATHER], max_tokens=24) for _ in range(3)]
    texts = ["".join(g) for g in runs]
    n = len(runs[0].prompt_ids)
    assert [g.stats.cached_tokens for g in runs] == [0, _reusable(n, n), _reusable(n, n)]
    fresh = "".join(_no_cache(eng).chat(msgs, tools=[WEATHER], max_tokens=24))
    assert texts == [fresh] * 3
    got, m = _hit_logits(eng, runs[0].prompt_ids)
    assert m == _reusable(n, n) and torch.equal(got, eng.logits(runs[0].prompt_ids)[m:])


def test_a_shared_system_prompt_is_copied_and_the_entry_kept(eng: Engine) -> None:
    "".join(eng.chat(TURN1, max_tokens=4))
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a river in Peru."}]
    gen = eng.chat(other, max_tokens=12)
    text = "".join(gen)
    shared = common_prefix(np.asarray(_ids(eng, TURN1)), np.asarray(gen.prompt_ids))
    assert gen.stats.cached_tokens == _reusable(shared, len(gen.prompt_ids)) > 0  # the system block
    assert eng.prefix_cache.stats()["prefix_cache_entries"] == 2  # both conversations kept
    assert "".join(_no_cache(eng).chat(other, max_tokens=12)) == text
    # logits over a copied prefix
    ids = _ids(eng, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}])
    got, n = _hit_logits(eng, ids)
    assert 0 < n <= len(_ids(eng, other[:1]))
    assert torch.equal(got, eng.logits(ids)[n:])


def test_long_prompt_hits_at_every_chunk_offset_match_a_fresh_run(eng: Engine) -> None:
    """Reuse points inside and at the edges of prefill chunks (256 tokens): the rows after them
    are the fresh run's, bitwise, whether the earlier prompt was shorter or longer."""
    base = eng.tokenizer.encode(SYSTEM * 6)
    assert len(base) > 2 * 256
    want = eng.logits(base)
    for cut in (33, 64, 250, 256, 257, 300, 511, 512, len(base) - 2):
        eng.prefix_cache.clear()
        with torch.inference_mode():
            cache = eng.model.new_cache()
            eng.model.forward(torch.tensor(base[:cut]), cache)
        eng.prefix_cache.put(base[:cut], cache)
        got, n = _hit_logits(eng, base)
        assert n == _reusable(cut, len(base)), cut
        assert torch.equal(got, want[n:]), cut


def test_structured_output_and_continue_compose_with_the_cache(eng: Engine) -> None:
    msgs = _second_turn(eng)
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    gen = eng.chat(msgs, max_tokens=24, response_format=fmt)
    text = "".join(gen)
    assert gen.stats.cached_tokens > 0
    assert text == "".join(_no_cache(eng).chat(msgs, max_tokens=24, response_format=fmt))
    partial = [*msgs, {"role": "assistant", "content": "The capital of Spain"}]
    gen = eng.chat(partial, max_tokens=8, continue_final_message=True)
    text = "".join(gen)
    assert gen.stats.cached_tokens > 0
    assert text == "".join(_no_cache(eng).chat(partial, max_tokens=8, continue_final_message=True))


def test_lru_eviction_under_a_tiny_budget(smol: Engine) -> None:
    model = smol.model
    per_token = model.new_cache().bytes_per_token
    pc = PrefixCache(budget_bytes=100 * per_token)
    a, b, c = list(range(1, 41)), list(range(100, 148)), list(range(200, 234))
    for ids in (a, b):
        cache = model.new_cache()
        cache.length = len(ids)
        pc.put(ids, cache)
    assert pc.stats()["prefix_cache_entries"] == 2 and pc.nbytes == 88 * per_token
    assert pc.take([*a, 5], model.new_cache)[1] == ATTN_GROUP  # a is used (and taken): b is now the oldest
    cache = model.new_cache()
    cache.length = len(a) + 1
    pc.put([*a, 5], cache)
    cache = model.new_cache()
    cache.length = len(c)
    pc.put(c, cache)  # 41 + 48 + 34 > 100: b goes
    s = pc.stats()
    assert s["prefix_cache_evictions"] == 1 and s["prefix_cache_entries"] == 2
    assert pc.take([*b, 1], model.new_cache)[1] == 0 and pc.take([*c, 1, 2], model.new_cache)[1] == ATTN_GROUP
    big = model.new_cache()
    big.length = 101
    pc.put(list(range(300, 401)), big)  # larger than the whole budget: not kept, nothing evicted
    assert pc.stats()["prefix_cache_evictions"] == 1


def test_hits_are_whole_attention_groups_and_leave_two_tokens(smol: Engine) -> None:
    model = smol.model
    pc = PrefixCache(budget_bytes=1 << 30)
    G = ATTN_GROUP
    ids = list(range(1, 3 * G + 4))  # 3 groups and 3 tokens
    cache = model.new_cache()
    cache.length = len(ids) + 5  # decode steps ran after the prompt: their rows are not kept
    pc.put(ids, cache)
    assert cache.length == len(ids) and pc.stats()["prefix_cache_bytes"] == len(ids) * cache.bytes_per_token
    for prompt, want in ((ids, 3 * G), (ids[:3 * G + 1], 2 * G), (ids[:3 * G + 2], 3 * G), ([*ids, 7], 3 * G),
                         (ids[:G + 1], 0), ([*ids[:40], 0, *ids[41:]], G)):
        pc.clear()
        cache = model.new_cache()
        cache.length = len(ids)
        pc.put(ids, cache)
        assert pc.take(prompt, model.new_cache)[1] == want, len(prompt)


def test_policy_budget_reaches_the_engine_and_stats_reach_metrics() -> None:
    from gateway.metrics import Metrics
    from gateway.policy.targets import LocalTarget
    from gateway.runtime import build_backend

    cfg = LocalTarget(kind="local", engine="local_engine", model_path="builtin:smollm2-135m", prefix_cache_mb=1.5)
    backend = build_backend("local", cfg)
    backend.load()
    assert backend.engine.prefix_cache.budget_bytes == int(1.5 * 2**20)
    stats = backend.stats()
    assert stats["prefix_cache_budget_bytes"] == int(1.5 * 2**20) and stats["prefix_cache_hits"] == 0
    metrics = Metrics()
    metrics.watch_engines(lambda: {"local": backend.stats()})
    assert 'hybrid_engine_stat{stat="prefix_cache_reused_tokens",target="local"} 0.0' in metrics.render().decode()


def test_long_prompts_prefill_in_chunks_with_the_same_logits(smol: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from local_engine.models import llama

    model = smol.model
    ids = torch.tensor(smol.tokenizer.encode(SYSTEM + "Where is Lima?"))
    assert len(ids) == 100  # 3 chunks of 32 and a rest of 4
    monkeypatch.setattr(llama, "PREFILL_CHUNK", 10**6)
    want = model.forward(ids, model.new_cache())
    monkeypatch.setattr(llama, "PREFILL_CHUNK", 32)
    calls = []
    inner = model._forward
    monkeypatch.setattr(model, "_forward", lambda i, c, last: calls.append(len(i)) or inner(i, c, last))
    cache = model.new_cache()
    got = model.forward(ids, cache)
    assert calls[:-1] == [32] * (len(calls) - 1) and sum(calls) == len(ids) and cache.length == len(ids)
    assert torch.equal(got, want)
    last = model.forward(ids, model.new_cache(), last_only=True)
    assert last.shape[0] == 1 and torch.equal(last[0], want[-1])


def test_scheduler_chunks_never_split_an_attention_group(smol: Engine) -> None:
    from local_engine.scheduler import Scheduler

    for asked, got in ((100, 96), (10, ATTN_GROUP), (256, 256)):
        s = Scheduler(_no_cache(smol), prefill_chunk=asked)
        try:
            assert s.prefill_chunk == got
        finally:
            s.close()
