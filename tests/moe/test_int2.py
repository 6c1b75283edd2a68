"""int2 experts: the 2-bit format, packing, the model reading it, and what it saves.

The kernel itself is checked against the dequantised matmul in tests/engine/test_qkernel.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from local_engine.errors import PackError
from local_engine.formats.pack import read_manifest
from local_engine.formats.pack_quant import dequantize, quantize_int2, unpack_int2
from local_engine.formats.pack_writer import pack
from local_engine.models.moe import MoEModel
from tests.moe.conftest import PROMPT, Tiny


def _best_symmetric_rms(w: torch.Tensor, group: int) -> float:
    """The best 4-level symmetric grid per group ({-2..1}·s or {±0.5, ±1.5}·s), scale by search."""
    g = w.reshape(w.shape[0], -1, group)
    a = g.abs().amax(-1, keepdim=True)
    best = None
    for f in torch.linspace(0.05, 1.0, 96):
        s = a * f
        for r in (torch.round(g / s).clamp(-2, 1) * s, (torch.round(g / s - 0.5).clamp(-2, 1) + 0.5) * s):
            e = ((r - g) ** 2).sum(-1)
            best = e if best is None else torch.minimum(best, e)
    assert best is not None
    return (best.sum() / w.numel()).sqrt().item()


def test_exactly_representable_weights_round_trip_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (24, 192), generator=gen, dtype=torch.uint8)
    codes[:, ::64] = 0  # every group spans the whole grid, so min/max recovers scale and min exactly
    codes[:, 1::64] = 3
    scale = (torch.rand(24, 3, generator=gen) + 0.1).half()
    mins = (torch.randn(24, 3, generator=gen)).half()
    w = dequantize_codes(codes, scale, mins)
    q, s, m = quantize_int2(w, 64)
    assert q.shape == (24, 48) and q.dtype == torch.uint8  # four values a byte
    assert torch.equal(unpack_int2(q, (24, 192)), codes)
    assert torch.equal(s, scale) and torch.equal(m, mins)
    assert torch.equal(dequantize(q, s, "int2", (24, 192), m), w)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    ng = scale.shape[1]
    g = codes.reshape(rows, ng, cols // ng).float() * scale.float()[..., None] + mins.float()[..., None]
    return g.reshape(rows, cols)


def test_byte_layout_is_the_documented_one() -> None:
    # block of 32 columns: byte j holds columns j, j+8, j+16, j+24 in bits 0-1, 2-3, 4-5, 6-7
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 3], codes[0, 11], codes[0, 19], codes[0, 27] = 1, 2, 3, 1
    scale, mins = torch.ones(1, 1).half(), torch.zeros(1, 1).half()
    q, _, _ = quantize_int2(dequantize_codes(codes, scale, mins), 32)
    assert q[0, 3].item() == 1 | (2 << 2) | (3 << 4) | (1 << 6)
    assert q[0].tolist().count(0) == 7


def test_refined_fit_beats_min_max_and_symmetric_grids_on_offset_groups() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256) + torch.randn(64, 4).repeat_interleave(64, 1) * 1.5  # groups off zero
    q, s, m = quantize_int2(w, 64)
    rms = (dequantize(q, s, "int2", (64, 256), m) - w).pow(2).mean().sqrt().item()
    q0, s0, m0 = quantize_int2(w, 64, refine=0)  # [min, max] only
    rms0 = (dequantize(q0, s0, "int2", (64, 256), m0) - w).pow(2).mean().sqrt().item()
    sym = _best_symmetric_rms(w, 64)
    print(f"int2 RMS: refined {rms:.3f}, min/max {rms0:.3f}, best symmetric {sym:.3f}")
    assert rms < 0.8 * rms0 and rms < 0.8 * sym


def test_pack_refuses_group_sizes_int2_cannot_use(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    from local_engine.cli import main

    src = tiny_models["qwen3_moe"].hf_dir  # hidden 64, expert width 64
    r = CliRunner().invoke(main, ["pack", str(src), str(tmp_path / "p"), "--quant", "int2", "--group-size", "16",
                                  "--no-progress"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "multiple of 32" in r.output and "use --group-size 32" in r.output
    with pytest.raises(PackError, match="use --group-size 64"):
        pack(src, tmp_path / "q", quant="int2", group_size=96, progress=False)
    assert not (tmp_path / "p" / "manifest.json").exists()


@pytest.fixture(scope="module")
def int2_packs(tiny_models: dict[str, Tiny], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int2")
    return {arch: pack(tiny_models[arch].hf_dir, root / arch, quant="int2", group_size=32, progress=False).root
            for arch in ("mixtral", "qwen2_moe")}


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_model_reads_int2_experts_through_the_kernel_as_dequantised(int2_packs: dict[str, Path],
                                                                     tiny_models: dict[str, Tiny],
                                                                     arch: str) -> None:
    """The packed-kernel path computes the model whose experts are the dequantised int2 weights,
    and that model is a (coarser) copy of the lossless one."""
    from local_engine import qkernel

    assert qkernel.load() is not None, qkernel.unavailable_reason
    m = MoEModel.open(int2_packs[arch], memory_budget=0)
    try:
        assert m.m.quant == "int2" and m.store._qlib is not None
        fast = m.logits(PROMPT)
        m.store._qlib = None  # Int2Linear's fallback: dequantise, then F.linear
        slow = m.logits(PROMPT)
        toks = list(m.generate_ids(PROMPT, 6))
    finally:
        m.close()
    assert ((fast - slow).abs().max() / slow.abs().max()).item() < 2e-3
    ref_m = MoEModel.open(tiny_models[arch].packed["none"], memory_budget="unlimited")
    i4 = MoEModel.open(tiny_models[arch].packed["int4"], memory_budget=0)
    try:
        ref, lg4 = ref_m.logits(PROMPT), i4.logits(PROMPT)
    finally:
        ref_m.close()
        i4.close()
    err2, err4 = (fast - ref).abs().mean().item(), (lg4 - ref).abs().mean().item()
    cos = torch.nn.functional.cosine_similarity(fast, ref, dim=-1).mean().item()
    print(f"{arch}: mean |logit err| int2 {err2:.3f} int4 {err4:.3f}; int2 cosine to lossless {cos:.3f}")
    assert err4 < err2 < 1.5 * ref.abs().mean().item() and cos > 0.5
    assert len(toks) == 6 and all(0 <= t < 128 for t in toks)


def _greedy_steps(m: MoEModel, n: int, follow: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The logits of ``n`` greedy one-token decode steps after PROMPT's prefill; with ``follow``
    (another run's steps) each step is fed that run's greedy token, not its own, so two runs
    whose logits differ a little are compared on the same tokens."""
    cache = m.new_cache(64)
    lg = m.forward(torch.tensor(PROMPT), cache)[-1:]
    steps: list[torch.Tensor] = []
    for i in range(n):
        prev = lg[-1] if follow is None or i == 0 else follow[i - 1]
        lg = m.forward(torch.tensor([int(prev.argmax())]), cache)
        steps.append(lg[-1])
    return steps


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("quant", ["int2", "int4"])
def test_decode_step_one_kernel_call_per_expert_equals_the_general_path(int2_packs: dict[str, Path],
                                                                        tiny_models: dict[str, Tiny],
                                                                        arch: str, quant: str) -> None:
    """A one-token step runs each grouped expert as one ``qkernel.gq_expert`` call
    (``MoEModel._moe_one``); it computes what the general path (``GroupLinear`` matrices and
    PyTorch's SwiGLU) computes, step after step, with a cache budget that keeps reading, up to
    its int8 activations (the general path's are int16): fed the same tokens, the logits stay
    within a few % of their largest (tests/engine/test_qkernel.py holds the kernel itself to an
    int8-activation reference at float rounding)."""
    path = int2_packs[arch] if quant == "int2" else tiny_models[arch].packed["int4"]
    m = MoEModel.open(path, memory_budget=0, prefetch=False)
    runs: dict[str, list[torch.Tensor]] = {}
    calls = 0
    try:
        fast_fn = m.store.expert_fn
        assert fast_fn is not None, "grouped experts of a 32-column group should take the one-call path"

        def counting(*a: object) -> None:
            nonlocal calls
            calls += 1
            fast_fn(*a)  # type: ignore[arg-type]

        m.store.expert_fn = None  # type: ignore[assignment]
        runs["general"] = _greedy_steps(m, 5)
        m.store.expert_fn = counting  # type: ignore[assignment]
        runs["fast"] = _greedy_steps(m, 5, follow=runs["general"])
    finally:
        m.close()
    n_moe = len(m.moe_layers)
    assert calls == 5 * n_moe * m.top_k  # every expert of every decode step, none of the prompt's
    for a, b in zip(runs["fast"], runs["general"], strict=True):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        print(f"{arch} {quant}: fast vs general {rel:.2e}")
        assert rel < 5e-2


@pytest.fixture(scope="module")
def demo_packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from local_engine.cli import main

    root = tmp_path_factory.mktemp("demo-int2")
    r = CliRunner().invoke(main, ["demo-moe", str(root / "demo"), "--no-progress"])
    assert r.exit_code == 0, r.output
    out = {}
    for q in ("int4", "int2"):
        r = CliRunner().invoke(main, ["pack", str(root / "demo"), str(root / q), "--quant", q, "--no-progress"])
        assert r.exit_code == 0, r.output
        out[q] = root / q
    return out


def test_int2_bank_is_about_half_of_int4(demo_packs: dict[str, Path]) -> None:
    m2, m4 = read_manifest(demo_packs["int2"]), read_manifest(demo_packs["int4"])
    h, i = 128, 128  # demo-moe defaults; 64-column groups
    weights = 3 * h * i
    # int2: 2 bits + fp16 scale + fp16 min per 64; int4: 4 bits + fp16 scale per 64
    assert m2.bundle_nbytes == weights // 4 + 2 * 2 * weights // 64
    assert m4.bundle_nbytes == weights // 2 + 2 * weights // 64
    ratio = m2.expert_bank_bytes / m4.expert_bank_bytes
    print(f"expert bank: int2 {m2.expert_bank_bytes} B, int4 {m4.expert_bank_bytes} B ({ratio:.2f}x)")
    assert 0.45 < ratio < 0.6  # (2 + 0.5) / (4 + 0.25) bits, then 4 KiB pages


def test_int2_generates_through_the_cli_and_the_library(demo_packs: dict[str, Path]) -> None:
    from local_engine.cli import main
    from local_engine.engine import Engine

    r = CliRunner().invoke(main, ["info", str(demo_packs["int2"])])
    assert r.exit_code == 0 and json.loads(r.stdout)["quant"] == "int2"
    budget = 2**19
    stats = {}
    for q in ("int4", "int2"):
        r = CliRunner().invoke(main, ["generate", str(demo_packs[q]), "--chat", "What is the capital of France?",
                                      "--max-tokens", "8", "--memory-budget", str(budget), "--stats"])
        assert r.exit_code == 0, r.output
        stats[q] = json.loads(r.stderr.splitlines()[-1])
    s2, s4 = stats["int2"], stats["int4"]
    assert s2["decode_tokens"] > 0  # (int4's greedy first token is end-of-turn on this random model)
    stride2 = read_manifest(demo_packs["int2"]).stride
    # the store's byte accounting is in int2 bundles: each read is one (smaller) bundle,
    # and the same budget holds more of them
    assert s2["store_reads"] > 0 and s2["store_bytes_read"] == s2["store_reads"] * stride2
    assert s2["store_cache_used_bytes"] == s2["store_cache_items"] * stride2 <= budget
    assert s2["store_cache_items"] > 1.5 * s4["store_cache_items"]
    assert s2["expert_bank_bytes"] < 0.6 * s4["expert_bank_bytes"]

    eng = Engine.open(demo_packs["int2"], memory_budget="256KiB")
    try:
        g = eng.chat([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
        text = "".join(g)
        st = g.stats.as_dict()
    finally:
        eng.close()
    assert text and st["store_reads"] > 0 and st["store_bytes_read"] == st["store_reads"] * stride2


@pytest.mark.parametrize(("budget", "prefetch"), [(0, False), (3, False), (3, True)])
def test_misses_multiplied_in_reader_threads_give_the_same_logits(int2_packs: dict[str, Path], budget: int,
                                                                   prefetch: bool) -> None:
    """``overlap_misses``: a one-token step's missed experts run in their reader threads as their
    bytes land (``ExpertStore.request(work=...)``), hits in the decode thread; each expert writes
    its own row and the rows are summed in expert order, so the logits are bitwise those of the
    serial loop whatever order the reads finish in. With next-layer prefetch, an adopted
    speculative read (read without ``work``) is multiplied too."""
    path = int2_packs["qwen2_moe"]
    runs: dict[bool, list[torch.Tensor]] = {}
    offloaded = {}
    for overlap in (False, True):
        m = MoEModel.open(path, memory_budget=budget * read_manifest(path).stride, prefetch=prefetch)
        m.overlap_misses = overlap
        try:
            runs[overlap] = _greedy_steps(m, 6)
            offloaded[overlap] = m.store.stats()["offloaded_compute_s"]
        finally:
            m.close()
    assert offloaded[False] == 0.0 and offloaded[True] > 0.0
    for a, b in zip(runs[True], runs[False], strict=True):
        assert torch.equal(a, b)
