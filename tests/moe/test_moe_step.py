"""The packed MoE model's one-token decode step (local_engine/models/moe_step.py): fused norms and
attention in C where the resident matrices are GGUF blocks. Its logits against the general path's
(``decode_step = None``) on the same tokens, the paths around it (speculative verify and self-draft,
the batched step, a compressed cache, context overflow) and the models it does not take."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from local_engine import kv_cache, norm_kernel
from local_engine.demo_moe import DemoShape, write_demo_moe
from local_engine.errors import ContextOverflow
from local_engine.formats.pack_writer import pack
from local_engine.models.layers import KVCache
from local_engine.models.moe import MoEModel
from tests.moe.conftest import PROMPT, Tiny

STEPS = 64


@pytest.fixture(scope="module")
def step_packs(tiny_models: dict[str, Tiny], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """int4 experts with int8 (Q8_0) resident matrices, as the benchmark's ``int4@int8``; plus the
    demo Qwen3-MoE at head dim 64 (the benchmark's; the tiny models' is 16)."""
    root = tmp_path_factory.mktemp("step")
    out = {}
    for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        out[arch] = root / arch
        pack(tiny_models[arch].hf_dir, out[arch], quant="int4", group_size=32, progress=False, dense="int8")
    src = root / "demo-src"
    write_demo_moe(src, DemoShape(layers=3, experts=8, top_k=2, hidden_size=256, moe_intermediate_size=64,
                                  heads=4, kv_heads=2, seed=5))
    out["demo"] = root / "demo"
    pack(src, out["demo"], quant="int4", group_size=32, progress=False, dense="int8")
    return out


def _decode(m: MoEModel, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, KVCache]:
    """Logits of each of ``tokens`` fed one at a time after ``prompt`` (teacher-forced), and the cache."""
    cache = m.new_cache(len(prompt) + len(tokens))
    assert isinstance(cache, KVCache)
    m.forward(torch.tensor(prompt), cache)
    return torch.cat([m.forward(torch.tensor([t]), cache) for t in tokens]), cache


def _int16_experts(m: MoEModel) -> None:
    """Run ``m``'s experts through the general path (GroupLinear, int16 activations), not the
    one-token kernel: that one quantises its activations to int8 per group, so a rounding-level
    difference before the experts (what these tests compare) can move a code by a step 256x the
    int16 one (measured: up to 1.8e-2 of the largest logit, demo, 64 tokens) and would swamp the
    step's own error. The experts are the same code on both paths being compared; the kernel
    against the general path: tests/moe/test_int2.py."""
    m.store.expert_fn = None


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "demo", "qwen2_moe-f32", "qwen3_moe-f32",
                                  "mixtral-none", "qwen2_moe-none", "qwen3_moe-none"])
def test_step_logits_equal_the_general_paths(step_packs: dict[str, Path], tiny_models: dict[str, Tiny],
                                             arch: str) -> None:
    """int8 (Q8_0) resident matrices and int4 experts; fp32 resident matrices (``-f32``, int4
    experts); everything fp32 (``-none``: no activation is quantised anywhere)."""
    name, _, kind = arch.partition("-")
    packed = tiny_models[name].packed["int4" if kind == "f32" else "none"] if kind else step_packs[arch]
    m = MoEModel.open(packed, memory_budget="unlimited", prefetch=False)
    _int16_experts(m)
    try:
        step = m.decode_step
        assert step is not None
        vocab = int(m.config["vocab_size"])
        m.decode_step = None
        tokens = list(m.generate_ids(PROMPT, STEPS))  # the general path's greedy continuation
        tokens += [(7 * i + 3) % vocab for i in range(STEPS - len(tokens))]  # an early stop's remainder
        want, want_cache = _decode(m, PROMPT, tokens)
        m.decode_step = step
        got, got_cache = _decode(m, PROMPT, tokens)
        diff = float((got - want).abs().max())
        agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        print(f"{arch}: {STEPS} tokens, max |logit diff| {diff:.2e} (max |logit| {float(want.abs().max()):.2f}),"
              f" argmax agreement {agree:.3f}")
        # the same arithmetic with sums in another order: all fp32, float rounding (measured ~1e-6
        # of the largest logit). The Q8_0 matrices' and the general path's int4 experts' kernels
        # quantise each activation row to int16 per block of 32, so a rounding-level difference in
        # a row can move a value by one quantisation step: measured ~1e-4 of the largest logit over
        # 64 tokens (2e-3 is those kernels' own error against fp32 matmuls, test_dense_quant.py)
        tol = 1e-5 if kind == "none" else 3e-4
        assert diff <= tol * float(want.abs().max()), diff
        top2 = want.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 4 * diff  # a near-tie may flip under rounding
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
        assert agree >= 0.95
        n = want_cache.length
        assert n == got_cache.length == len(PROMPT) + STEPS
        kv_want = want_cache.kv[:, :, :n]
        kv_diff = float((got_cache.kv[:, :, :n] - kv_want).abs().max())
        print(f"  K/V rows written: max |diff| {kv_diff:.2e} (max |value| {float(kv_want.abs().max()):.2f})")
        assert kv_diff <= tol * float(kv_want.abs().max())
    finally:
        m.close()


def test_greedy_decoding_runs_the_step(step_packs: dict[str, Path]) -> None:
    m = MoEModel.open(step_packs["qwen3_moe"], memory_budget="unlimited", prefetch=True)
    try:
        step = m.decode_step
        assert step is not None
        calls = []

        def counted(*a: object) -> torch.Tensor:
            calls.append(1)
            assert step is not None
            return step(*a)  # type: ignore[arg-type]

        m.decode_step = counted  # type: ignore[assignment]
        out = list(m.generate_ids(PROMPT, 5))
        # a forward per token (generate_ids runs one past the last), none for the prompt
        assert len(calls) == len(out) == m.stats()["decode_tokens"]
    finally:
        m.close()


def test_verify_and_self_draft_after_steps(step_packs: dict[str, Path]) -> None:
    """A speculative verify (several rows: the general path) after step-written K/V, and the
    self-draft (steps on one expert per token) leaving the cache as it found it."""
    m = MoEModel.open(step_packs["qwen3_moe"], memory_budget="unlimited", prefetch=False)
    try:
        tokens = list(m.generate_ids(PROMPT, 8))
        want, _ = _decode(m, PROMPT, tokens[:7])
        cache = m.new_cache(64)
        m.forward(torch.tensor(PROMPT), cache)
        for t in tokens[:4]:
            m.forward(torch.tensor([t]), cache)
        kv = cache.kv.clone()
        draft = m.self_draft(tokens[3], cache, 3)
        assert len(draft) == 3 and cache.length == len(PROMPT) + 4
        assert torch.equal(cache.kv[:, :, :cache.length], kv[:, :, :cache.length])
        got = m.verify_forward(torch.tensor(tokens[4:7]), cache)
        assert cache.length == len(PROMPT) + 7
        # rows of a several-row matmul and a prefill attention: other sums, same values
        assert torch.allclose(got, want[4:7], rtol=0, atol=2e-3 * float(want.abs().max()))
        assert torch.equal(got.argmax(-1), want[4:7].argmax(-1))
    finally:
        m.close()


def test_batched_step_after_steps(step_packs: dict[str, Path]) -> None:
    m = MoEModel.open(step_packs["mixtral"], memory_budget="unlimited", prefetch=False)
    _int16_experts(m)
    try:
        prompts = [PROMPT[:5], PROMPT[3:10]]
        caches = [m.new_cache(32) for _ in prompts]
        for p, c in zip(prompts, caches, strict=True):
            m.forward(torch.tensor(p), c)
            m.forward(torch.tensor([11]), c)  # a step
        ids = torch.tensor([12, 13])
        want = torch.cat([_decode(m, [*p, 11], [int(t)])[0] for p, t in zip(prompts, ids, strict=True)])
        got = m.step_batch(ids, caches)
        assert [c.length for c in caches] == [len(p) + 2 for p in prompts]
        assert torch.allclose(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))
    finally:
        m.close()


def test_a_compressed_cache_keeps_the_general_path(step_packs: dict[str, Path]) -> None:
    m = MoEModel.open(step_packs["qwen3_moe"], memory_budget="unlimited", prefetch=False)
    try:
        plain = list(m.generate_ids(PROMPT, 6))
        m.kv_config = kv_cache.KVConfig(dtype="bf16")
        cache = m.new_cache(64)
        assert not isinstance(cache, KVCache)
        m.forward(torch.tensor(PROMPT), cache)
        lg = m.forward(torch.tensor([plain[0]]), cache)
        assert lg.shape == (1, m.config["vocab_size"]) and cache.length == len(PROMPT) + 1
    finally:
        m.close()


def test_context_overflow(step_packs: dict[str, Path]) -> None:
    m = MoEModel.open(step_packs["qwen3_moe"], memory_budget="unlimited", prefetch=False)
    try:
        cache = m.new_cache(len(PROMPT) + 1)
        m.forward(torch.tensor(PROMPT), cache)
        m.forward(torch.tensor([3]), cache)
        with pytest.raises(ContextOverflow):
            m.forward(torch.tensor([4]), cache)
    finally:
        m.close()


def test_models_the_step_does_not_take(step_packs: dict[str, Path], tiny_models: dict[str, Tiny]) -> None:
    for packed in (step_packs["olmoe"], tiny_models["olmoe"].packed["int4"]):  # q, k normed over the projection
        m = MoEModel.open(packed, memory_budget="unlimited", prefetch=False)
        try:
            assert m.decode_step is None
            assert len(list(m.generate_ids(PROMPT, 3))) == 3
        finally:
            m.close()


def test_norm_kernel_equals_torch() -> None:
    lib, why = norm_kernel.KERNEL.get()
    if lib is None:
        pytest.skip(f"norm kernel unavailable: {why}")
    g = torch.Generator().manual_seed(0)
    for n in (768, 64, 20):  # 8-lane sums with and without a tail, and a short scalar row
        x, w = torch.randn(n, generator=g) * 3, torch.randn(n, generator=g)
        y = torch.empty(n)
        lib.rms_row(x.data_ptr(), w.data_ptr(), 1e-6, n, y.data_ptr())
        assert torch.allclose(y, F.rms_norm(x, (n,), w, 1e-6), rtol=1e-5, atol=1e-6)
    hq, hk, hd = 4, 2, 16
    r = torch.randn(hq + 2 * hk, hd, generator=g)
    qw, kw = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    want = torch.cat([F.rms_norm(r[:hq], (hd,), qw, 1e-6), F.rms_norm(r[hq:hq + hk], (hd,), kw, 1e-6), r[hq + hk:]])
    lib.head_norms(r.data_ptr(), hq, hk, hd, qw.data_ptr(), kw.data_ptr(), 1e-6)
    assert torch.allclose(r, want, rtol=1e-5, atol=1e-6)
