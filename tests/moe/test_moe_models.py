"""Packed MoE models vs transformers: logits, greedy tokens across budgets, quantised packs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from cache_research import TraceRecorder

from local_engine.models.moe import MoEModel
from tests.moe.conftest import ARCHS, GEN_STEPS, PROMPT, Tiny, compare_with_transformers

TOL = 1e-4  # fp32, same op order up to GEMM blocking


def _budgets(t: Tiny) -> dict[str, int | str]:
    from local_engine.formats.pack import read_manifest

    m = read_manifest(t.packed["none"])
    # middle: a bit more than one layer's top-k, far below the bank -> hits AND evictions
    return {"zero": 0, "middle": 3 * m.stride, "unlimited": "unlimited"}


def _hf_logits(t: Tiny, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return t.hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow
def test_logits_and_greedy_match_transformers_at_every_budget(tiny_models: dict[str, Tiny], arch: str) -> None:
    t = tiny_models[arch]
    ref = _hf_logits(t, PROMPT)
    tokens: dict[str, list[int]] = {}
    runs = {"zero": [("layer-lfu", False), ("layer-lfu", True)],
            "middle": [("lru", False), ("lfu-da", False), ("tinylfu", False), ("layer-lfu", False),
                       ("layer-lfu", True), ("adaptive", "auto")],
            "unlimited": [("layer-lfu", False)]}
    for label, budget in _budgets(t).items():
        for policy, prefetch in runs[label]:
            m = MoEModel.open(t.packed["none"], memory_budget=budget, policy=policy, prefetch=prefetch)
            try:
                diff = (m.logits(PROMPT) - ref).abs().max().item()
                print(f"{arch} budget={label} policy={policy}: max |logit diff| vs transformers = {diff:.2e}")
                assert diff < TOL
                toks = list(m.generate_ids(PROMPT, GEN_STEPS))
                s = m.stats()
                if label == "zero":
                    assert s["store_cache_hits"] == 0 and s["bytes_read_per_token"] > 0
                if label == "middle":
                    assert s["store_cache_evictions"] > 0
                    assert s["store_cache_used_bytes"] <= 3 * m.m.stride
                # every read is a demand miss not covered by a guess, or a guess (used or wasted)
                assert s["store_reads"] == s["store_cache_misses"] - s["store_prefetch_used"] + s["store_prefetch_reads"]
                if prefetch and label == "zero":
                    assert s["store_prefetch_reads"] > 0 and s["store_prefetch_used"] > 0
                if prefetch is False:
                    assert s["store_prefetch_reads"] == 0
                if prefetch == "auto":  # the switch's first trial starts with a block of prefetching tokens
                    assert s["prefetch_auto_on_tokens"] > 0 and s["store_prefetch_reads"] > 0
            finally:
                m.close()
            tokens[f"{label}/{policy}/prefetch={prefetch}"] = toks
    first = next(iter(tokens.values()))
    assert all(v == first for v in tokens.values()), tokens
    # greedy tokens are what transformers' argmax picks on the same (teacher-forced) sequence
    full = _hf_logits(t, PROMPT + first)
    hf_greedy = full[len(PROMPT) - 1: -1].argmax(-1).tolist()
    assert first == hf_greedy


def test_unlimited_budget_second_run_reads_nothing(tiny_models: dict[str, Tiny]) -> None:
    m = MoEModel.open(tiny_models["qwen3_moe"].packed["none"], memory_budget="unlimited")
    try:
        a = list(m.generate_ids(PROMPT, 4))
        m.reset_stats()
        b = list(m.generate_ids(PROMPT, 4))
        s = m.stats()
    finally:
        m.close()
    assert a == b
    assert s["store_bytes_read"] == 0 and s["hit_rate"] == 1.0


def test_a_budget_holding_the_whole_bank_skips_policy_bookkeeping(tiny_models: dict[str, Tiny]) -> None:
    # Nothing can be evicted then, so the requested policy's bookkeeping would be pure cost.
    packed = tiny_models["qwen3_moe"].packed["none"]
    for budget, expected in (("unlimited", "lru"), (0, "adaptive")):
        m = MoEModel.open(packed, memory_budget=budget, policy="adaptive")
        try:
            list(m.generate_ids(PROMPT, 2))
            assert m.stats()["store_cache_policy"] == expected
        finally:
            m.close()


def test_buffered_reads_equal_o_direct(tiny_models: dict[str, Tiny]) -> None:
    p = tiny_models["mixtral"].packed["none"]
    outs = []
    for direct in (True, False):
        m = MoEModel.open(p, memory_budget=0, direct=direct, verify="always")
        try:
            outs.append(m.logits(PROMPT))
        finally:
            m.close()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_quantised_packs_stay_close_to_lossless(tiny_models: dict[str, Tiny], arch: str) -> None:
    t = tiny_models[arch]
    lossless = MoEModel.open(t.packed["none"], memory_budget="unlimited")
    try:
        ref = lossless.logits(PROMPT)
        ref_toks = list(lossless.generate_ids(PROMPT, GEN_STEPS))
    finally:
        lossless.close()
    scale = ref.abs().mean().item()
    # (mean |err| / mean |logit|, min greedy agreement). Mean, not max: a quantised hidden state can
    # flip one router decision, which moves a few logits a lot while the rest stay close.
    bounds = {"int8": (0.05, 0.7), "int4": (0.5, 0.3)}
    for q, (err_bound, agree_bound) in bounds.items():
        m = MoEModel.open(t.packed[q], memory_budget=0)
        try:
            d = (m.logits(PROMPT) - ref).abs()
            err, err_max = d.mean().item(), d.max().item()
            # agreement of teacher-forced greedy choices on the lossless continuation
            lg = m.logits(PROMPT + ref_toks)[len(PROMPT) - 1: -1].argmax(-1).tolist()
        finally:
            m.close()
        agree = sum(a == b for a, b in zip(lg, ref_toks, strict=True)) / len(ref_toks)
        print(f"{arch} {q}: mean |logit err| {err:.4f} ({err / scale:.2%} of mean |logit|), "
              f"max {err_max:.3f}, greedy agreement {agree:.0%}")
        assert err / scale < err_bound
        assert agree >= agree_bound


def test_engine_open_registers_packed_dirs(tiny_models: dict[str, Tiny]) -> None:
    """Engine.open picks the packed-MoE loader; logits, text generation and stats go through it."""
    from local_engine.engine import Engine
    from local_engine.formats.pack import read_manifest

    t = tiny_models["qwen2_moe"]
    stride = read_manifest(t.packed["none"]).stride
    eng = Engine.open(t.packed["none"], memory_budget=4 * stride, policy="lru")
    try:
        assert eng.info()["format"] == "flash-moe-pack" and eng.info()["cache_budget_bytes"] == 4 * stride
        diff = (eng.logits(PROMPT) - _hf_logits(t, PROMPT)).abs().max().item()
        assert diff < TOL
        gen = eng.generate(" ".join(f"w{i}" for i in PROMPT), max_tokens=6, temperature=0)
        text = "".join(gen)
        assert len(text.split()) == 6
        s = gen.stats.as_dict()
        assert s["store_bytes_read"] > 0 and 0.0 <= s["hit_rate"] <= 1.0 and s["peak_rss_bytes"] > 0
        # the engine's greedy continuation is ours (and transformers') greedy continuation
        m = eng.model
        ours = list(m.generate_ids(PROMPT, 6))
        assert text.split() == [f"w{i}" for i in ours]
    finally:
        eng.model.close()


@pytest.mark.parametrize("how", ["env", "flag"])
def test_local_engine_generate_stats_on_a_packed_dir(tiny_models: dict[str, Tiny],
                                                     monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """`local-engine generate PACKED --stats` streams through the expert store and prints its stats."""
    import json

    from click.testing import CliRunner

    from local_engine.cli import main

    budget: list[str] = []
    if how == "env":
        monkeypatch.setenv("LOCAL_ENGINE_MOE_BUDGET", "0")
    else:
        monkeypatch.setenv("LOCAL_ENGINE_MOE_BUDGET", "1GiB")  # the flag wins over the environment
        budget = ["--memory-budget", "0"]
    r = CliRunner().invoke(main, ["generate", str(tiny_models["mixtral"].packed["int8"]), "--prompt",
                                  " ".join(f"w{i}" for i in PROMPT), "--max-tokens", "5", "--stats", *budget])
    assert r.exit_code == 0, r.output
    extra = json.loads(r.stderr.strip().splitlines()[-1])
    assert extra["store_cache_budget_bytes"] == 0 and extra["hit_rate"] == 0.0
    assert extra["bytes_read_per_token"] > 0 and extra["read_bandwidth_Bps"] > 0
    assert len(r.stdout.split()) == 5


@pytest.mark.parametrize("flags, prefetch_reads, auto", [
    ([], True, True),  # auto: its first trial block prefetches
    (["--prefetch", "on", "--cache-policy", "lru"], True, False),
    (["--prefetch", "off", "--cache-policy", "lru"], False, False),
])
def test_local_engine_generate_prefetch_and_policy_flags(tiny_models: dict[str, Tiny], flags: list[str],
                                                         prefetch_reads: bool, auto: bool) -> None:
    import json

    from click.testing import CliRunner

    from local_engine.cli import main
    from local_engine.formats.pack import read_manifest

    t = tiny_models["qwen3_moe"]
    budget = str(3 * read_manifest(t.packed["none"]).stride)  # 3 of 24 bundles: something to read
    r = CliRunner().invoke(main, ["generate", str(t.packed["none"]), "--prompt", " ".join(f"w{i}" for i in PROMPT),
                                  "--max-tokens", "6", "--stats", "--memory-budget", budget, *flags])
    assert r.exit_code == 0, r.output
    extra = json.loads(r.stderr.strip().splitlines()[-1])
    assert (extra["store_prefetch_reads"] > 0) is prefetch_reads
    assert ("prefetch_auto_trials" in extra) is auto
    assert extra["store_cache_policy"] == ("lru" if "lru" in flags else "adaptive")


def test_prefill_reads_each_touched_expert_once_per_layer(tiny_models: dict[str, Tiny]) -> None:
    rec = TraceRecorder()
    m = MoEModel.open(tiny_models["qwen2_moe"].packed["none"], memory_budget=0, recorder=rec)
    try:
        m.logits(PROMPT)  # 12 tokens x top-2 in one micro-batch
        trace, io = rec.trace, m.store.io
    finally:
        m.close()
    assert [layer for layer, _ in trace] == m.m.moe_layers  # one request per MoE layer, dense layer skipped
    assert all(len(set(es)) == len(es) for _, es in trace)
    assert io.reads == sum(len(es) for _, es in trace) and any(len(es) > 2 for _, es in trace)


def test_quantised_bundles_are_smaller(tiny_models: dict[str, Tiny]) -> None:
    from local_engine.formats.pack import read_manifest

    p = tiny_models["mixtral"].packed
    n = {q: read_manifest(p[q]).bundle_nbytes for q in ("none", "int8", "int4")}
    # fp32 -> 1 byte (+ fp16 scale per 32) -> half a byte (+ the same scales)
    assert n["int8"] < n["none"] * 0.30 and n["int4"] < n["int8"] * 0.65


def test_bf16_checkpoint_packs_losslessly(tiny_models: dict[str, Tiny], tmp_path) -> None:
    """Real checkpoints are bf16: `none` keeps bf16 bits on disk, compute upcasts to fp32."""
    import copy

    from local_engine.formats.pack import read_manifest
    from local_engine.formats.pack_writer import pack

    t = tiny_models["qwen3_moe"]
    hf16 = copy.deepcopy(t.hf).to(torch.bfloat16)
    hf16.save_pretrained(tmp_path / "bf16")
    pack(tmp_path / "bf16", tmp_path / "packed", quant="none", progress=False)
    assert {p.dtype for p in read_manifest(tmp_path / "packed").parts} == {"BF16"}
    # the same bf16-rounded parameters in the fp32 model (hf16.float() would keep its RoPE buffer rounded)
    ref_model = copy.deepcopy(t.hf)
    with torch.no_grad():
        for (_, p32), (_, p16) in zip(ref_model.named_parameters(), hf16.named_parameters(), strict=True):
            p32.copy_(p16.float())
    got = compare_with_transformers(ref_model, tmp_path / "packed", 0, "bf16 pack (bf16 weights, fp32 compute)")
    assert got.diff < TOL


def test_prefetch_auto_is_on_trial_unless_the_bank_fits(tiny_models: dict[str, Tiny]) -> None:
    import pytest

    from local_engine.formats.pack import read_manifest

    packed = tiny_models["qwen3_moe"].packed["none"]
    m = read_manifest(packed)
    for budget, want in ((0, "auto"), (3 * m.stride, "auto"), ("unlimited", False), (m.expert_bank_bytes, False)):
        model = MoEModel.open(packed, memory_budget=budget)
        try:
            assert model.prefetch == want and model.describe()["prefetch"] == want
            assert ("prefetch_auto_trials" in model.stats()) is (want == "auto")
        finally:
            model.close()
    with pytest.raises(ValueError, match="prefetch must be"):
        MoEModel.open(packed, prefetch="sometimes")
