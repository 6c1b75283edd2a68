"""Speculative decoding on packed MoE models (issue #20): greedy output identical to plain decoding
with prompt-lookup drafts and with the self-draft (the same model on one expert per token), across
expert-cache budgets; a verify reads the union of its positions' experts once per layer and counts
as one decode forward; the self-draft leaves the KV cache as it found it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from local_engine.engine import Engine
from local_engine.formats.pack import read_manifest
from local_engine.models.moe import MoEModel
from tests.moe.conftest import Tiny

# repeats, so prompt lookup finds drafts; word ids of the tiny models' tokenizer
PROMPT = " ".join(f"w{i}" for i in [5, 17, 99, 3, 64, 8, 120, 42, 5, 17, 99, 3, 64, 8])


def _gen(eng: Engine, mode: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    gen = eng.generate(PROMPT, max_tokens=16, speculative=mode, **kw)
    return "".join(gen), gen.stats.extra


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("budget_strides", [3, 10**6])  # a few experts cached (reads every step) / the bank
def test_greedy_output_is_identical_to_plain_decoding(tiny_models: dict[str, Tiny], arch: str,
                                                      budget_strides: int) -> None:
    packed = tiny_models[arch].packed["int4"]
    budget = budget_strides * read_manifest(packed).stride
    eng = Engine.open(packed, memory_budget=budget, prefetch=False, prefix_cache_mb=0)
    try:
        plain, _ = _gen(eng, "off")
        for mode in ("prompt-lookup", "draft"):
            text, st = _gen(eng, mode)
            assert text == plain, mode
            assert st["spec_mode"] == mode and st["spec_verifies"] > 0
        assert st["spec_drafted"] > 0 and st["spec_verifies"] * 3 >= st["spec_drafted"]  # 3 drafts a verify at most
        # sampling keeps going with the self-draft (distribution: tests/engine/test_speculative.py)
        text, st = _gen(eng, "draft", temperature=0.8, seed=3)
        assert st["spec_verifies"] > 0 and text
    finally:
        eng.close()


def test_verify_reads_the_union_of_its_positions_experts_once_per_layer(tiny_models: dict[str, Tiny]) -> None:
    packed = tiny_models["qwen3_moe"].packed["int4"]
    m = MoEModel.open(packed, memory_budget=3 * read_manifest(packed).stride, prefetch=False)
    try:
        ids = torch.tensor([5, 17, 99, 3, 64, 8, 120])
        cache = m.new_cache(64)
        m.forward(ids, cache)
        requests: list[tuple[int, list[int]]] = []
        real = m.store.request

        def spy(layer: int, experts: list[int], *a: Any, **kw: Any) -> Any:
            requests.append((layer, list(experts)))
            return real(layer, experts, *a, **kw)

        m.store.request = spy  # type: ignore[method-assign]
        before = dict(m.stats())
        verify_ids = torch.tensor([42, 5, 17, 99])
        rows = m.verify_forward(verify_ids, cache)
        after = m.stats()
        layers = [layer for layer, _ in requests]
        assert sorted(layers) == sorted(m.moe_layers) and len(set(layers)) == len(layers)  # once per layer
        assert all(e == sorted(set(e)) for _, e in requests)
        assert sum(len(e) for _, e in requests) > len(m.moe_layers) * m.top_k  # a union, not one token's
        hits = after["store_cache_hits"] - before["store_cache_hits"]
        misses = after["store_cache_misses"] - before["store_cache_misses"]
        assert hits + misses == sum(len(e) for _, e in requests)  # one hit or miss per expert read
        assert after["spec_verifies"] == 1 and after["spec_verify_positions"] == 4
        assert after["decode_tokens"] == before["decode_tokens"] + 1
        assert after["prefill_tokens"] == before["prefill_tokens"]  # a verify is not a prefill
        m.store.request = real  # type: ignore[method-assign]
        fresh = m.new_cache(64)
        m.forward(ids, fresh)
        # one-token steps: their experts run as the verify's rows do (gq_expert, int8 activations;
        # a prefill's take the int16 path, ~5e-2 away), so what is left is batched vs cached attention
        steps = torch.cat([m.forward(verify_ids[i:i + 1], fresh) for i in range(len(verify_ids))])
        torch.testing.assert_close(rows, steps, atol=1e-3, rtol=0)
    finally:
        m.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_a_verify_rows_experts_are_the_steps_bit_for_bit(tiny_models: dict[str, Tiny], arch: str) -> None:
    """A few rows' experts (a verify's) run through the one-token kernel per row and are summed as a
    step sums them: each row's MoE output is exactly what a one-token step gives for that row."""
    packed = tiny_models[arch].packed["int4"]
    m = MoEModel.open(packed, memory_budget=3 * read_manifest(packed).stride, prefetch=False)
    try:
        torch.manual_seed(0)
        h = torch.randn(4, m.H)
        layer = min(m.moe_layers)
        fn = m.store.expert_fn
        assert fn is not None
        with torch.inference_mode():
            # one routing for both (the router's matmul over 4 rows rounds apart from over one)
            logits = torch.nn.functional.linear(h, m.w[f"model.layers.{layer}.{m.spec.moe_prefix}.gate.weight"])
            w, idx = m.route(logits)
            rows = m._moe_rows(layer, h, logits, w, idx, fn)
            steps = torch.cat([m._moe_one(layer, h[r:r + 1], logits[r:r + 1], w[r:r + 1], idx[r:r + 1], fn)
                               for r in range(h.shape[0])])
        assert torch.equal(rows, steps)
    finally:
        m.close()


def test_self_draft_leaves_the_cache_as_it_found_it(tiny_models: dict[str, Tiny]) -> None:
    packed = tiny_models["mixtral"].packed["none"]
    m = MoEModel.open(packed, memory_budget="unlimited", prefetch=False)
    try:
        ids = torch.tensor([5, 17, 99, 3, 64, 8])
        cache = m.new_cache(64)
        m.forward(ids, cache)
        draft = m.self_draft(120, cache, 4)
        assert len(draft) == 4 and cache.length == len(ids)
        assert m.stats()["spec_draft_tokens"] == 4
        # the draft's K/V rows are overwritten: later logits equal a fresh run's
        got = m.forward(torch.tensor([120, *draft]), cache)
        fresh = m.forward(torch.tensor([*ids.tolist(), 120, *draft]), m.new_cache(64))
        torch.testing.assert_close(got, fresh[len(ids):], atol=1e-4, rtol=0)
    finally:
        m.close()


def _tiny_dense_draft(dst: Path, vocab: int) -> Path:
    """A small random Llama with the tiny MoEs' vocabulary and word tokenizer: a dense draft model."""
    import transformers

    from tests.moe.conftest import _save_word_tokenizer

    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
    _save_word_tokenizer(dst, vocab)
    return dst


@pytest.mark.parametrize("draft", ["int4-pack", "dense"])
def test_a_draft_model_drafts_for_a_packed_moe(tiny_models: dict[str, Tiny], tmp_path: Path, draft: str) -> None:
    """The target: a packed Qwen3-MoE; the draft: the same checkpoint packed at int4 (lower-bit
    experts, a second checkpoint) or a small dense model sharing its tokenizer. Greedy output is
    plain decoding's either way; the int4 twin's drafts are often accepted."""
    t = tiny_models["qwen3_moe"]
    src = str(t.packed["int4"]) if draft == "int4-pack" else str(_tiny_dense_draft(tmp_path / "d", 128))
    eng = Engine.open(t.packed["none"], memory_budget=3 * read_manifest(t.packed["none"]).stride, prefetch=False,
                      prefix_cache_mb=0, draft_model=src)
    try:
        assert eng.draft_model is not None
        plain, _ = _gen(eng, "off")
        for mode in ("draft", "auto"):
            text, st = _gen(eng, mode)
            assert text == plain, mode
        text, st = _gen(eng, "draft")
        assert st["spec_verifies"] > 0 and st["spec_drafted"] > 0
        if draft == "int4-pack":
            assert st["spec_accepted"] > 0.3 * st["spec_drafted"]  # random weights: int4 noise flips some argmaxes
    finally:
        eng.close()


def test_a_draft_model_with_another_tokenizer_is_refused(tiny_models: dict[str, Tiny]) -> None:
    from local_engine.engine import resolve
    from local_engine.errors import EngineError

    with pytest.raises(EngineError, match=r"draft_model .*tokenizer is not the target's"):
        Engine.open(tiny_models["mixtral"].packed["int4"], draft_model=str(resolve("builtin:smollm2-135m")))


def test_auto_prices_a_verify_from_the_routing_it_saw_and_keeps_greedy_output(tiny_models: dict[str, Tiny]) -> None:
    packed = tiny_models["qwen3_moe"].packed["int4"]
    eng = Engine.open(packed, memory_budget=3 * read_manifest(packed).stride, prefetch=False, prefix_cache_mb=0)
    try:
        m = eng.model
        assert isinstance(m, MoEModel)
        assert m.verify_cost_prior(17) is None  # nothing decoded yet: no verify is priced
        plain, _ = _gen(eng, "off")
        prior = m.verify_cost_prior(17)
        assert prior is not None and len(prior) == 18 and prior[1] == 1.0
        assert all(a <= b for a, b in itertools.pairwise(prior[1:]))
        # what the prior read: the decode steps' experts (top-k of each MoE layer) and their time share
        u = m.routes.union_sizes(4)
        assert u[1] == pytest.approx(m.top_k) and m.top_k <= u[2] <= 2 * m.top_k
        assert m.expert_share is not None and 0.0 < m.expert_share <= 1.0
        text, st = _gen(eng, "auto")
        assert text == plain
        assert st["spec_mode"] == "auto" and st["spec_auto_explore_loss"] <= 1.0 + 0.02 * 16
        assert sum(st["spec_auto_k"].values()) > 0
    finally:
        eng.close()
