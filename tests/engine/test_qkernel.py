"""The AVX2 GGUF-block kernel against a float reference built from the same blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from local_engine import qkernel
from local_engine.quant import GGUFBlockLinear
from local_engine.store import RawTensor


@pytest.fixture(scope="module")
def lib():
    lib = qkernel.load()
    assert lib is not None, f"qkernel could not be built here: {qkernel.unavailable_reason}"
    return lib


def _blocks(qtype: str, rows: int, cols: int, seed: int) -> tuple[RawTensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    w = g.standard_normal((rows, cols)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    q = gguf.quants.quantize(w, qt)
    deq = torch.from_numpy(gguf.quants.dequantize(q, qt).astype(np.float32)).reshape(rows, cols)
    return RawTensor("w", qtype, (rows, cols), q.reshape(rows, -1)), deq


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("m", [1, 3, 97])
def test_matches_dequantised_matmul(lib, qtype: str, m: int) -> None:
    # 300 rows: not a multiple of the 16-row chunks nor of the 4-row tiles (remainder paths)
    raw, deq = _blocks(qtype, 300, 1536, seed=m)
    lin = GGUFBlockLinear.from_raw(lib, [raw])
    x = torch.randn(m, 1536, generator=torch.Generator().manual_seed(1))
    x[:, 7] *= 60.0  # an outlier channel, as SmolLM2 has: only its own block gets coarser
    ref = x @ deq.T
    rel = ((lin(x) - ref).abs().max() / ref.abs().max()).item()
    assert rel < 5e-4, f"{qtype} M={m}: relative error {rel:.2e}"


def test_fused_rows_bias_and_shapes(lib) -> None:
    a, da = _blocks("Q4_1", 64, 576, seed=3)
    b, db = _blocks("Q4_1", 32, 576, seed=4)
    bias = torch.randn(96)
    lin = GGUFBlockLinear.from_raw(lib, [a, b], bias)
    x = torch.randn(2, 5, 576)
    y = lin(x)
    assert y.shape == (2, 5, 96)
    ref = x @ torch.cat([da, db]).T + bias
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 5e-4


def _on_one_and_two_threads(lin, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(2)
        return one, lin(x)
    finally:
        torch.set_num_threads(before)


def test_two_threads_same_result(lib) -> None:
    raw, _ = _blocks("Q8_0", 4000, 576, seed=5)  # 2 x 4000 x 576 MACs: above the kernel's threading threshold
    lin = GGUFBlockLinear.from_raw(lib, [raw])
    x = torch.randn(2, 576)
    one, two = _on_one_and_two_threads(lin, x)
    assert torch.equal(one, two)  # rows are split between threads, each row's sum is the same


def test_mixed_block_types_are_refused(lib) -> None:
    a, _ = _blocks("Q4_1", 32, 64, seed=6)
    b, _ = _blocks("Q8_0", 32, 64, seed=7)
    with pytest.raises(ValueError, match="mixed block types"):
        GGUFBlockLinear.from_raw(lib, [a, b])


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_ENGINE_NO_CKERNEL", "1")
    with pytest.raises(RuntimeError, match="LOCAL_ENGINE_NO_CKERNEL"):
        qkernel.build()


def test_compiler_error_is_reported(monkeypatch, tmp_path) -> None:
    # a broken compiler must give a reason (then the model falls back to PyTorch), not a crash
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: no such thing' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("LOCAL_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="no such thing"):
        qkernel.build()


def test_model_falls_back_to_torch_kernels(monkeypatch, smol_path, smol) -> None:
    # no compiler / no AVX2: the same GGUF still loads, with fp16 matrices and an int8 head
    from local_engine.engine import Engine

    monkeypatch.setattr(qkernel, "load", lambda: None)
    eng = Engine.open(smol_path)
    info = eng.info()
    assert info["kernel"].startswith("torch") and "f16" in info["matrices"]
    ids = list(range(400, 416))
    a, b = eng.logits(ids), smol.logits(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.75


# --------------------------------------------------------------------------- int2 (MoE experts)

def _int2(rows: int, cols: int, group: int, seed: int):
    from local_engine.formats.pack_quant import dequantize, quantize_int2

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q, s, m = quantize_int2(w, group)
    return q, s, m, dequantize(q, s, "int2", (rows, cols), m)


# odd group counts (3, 5, 7 groups), a group as wide as the row, rows that fill no 16-row chunk
# nor 4-row tile, M from a decode step to a prefill batch (the 2x4 tiles and their remainders)
@pytest.mark.parametrize("rows,cols,group", [(301, 96, 32), (37, 480, 96), (640, 224, 32), (5, 64, 64),
                                             (768, 320, 64)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_int2_matches_dequantised_matmul(lib, rows: int, cols: int, group: int, m: int) -> None:
    from local_engine.quant import Int2Linear

    q, s, mn, deq = _int2(rows, cols, group, seed=rows + m)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(2))
    x[:, 5] *= 60.0  # an outlier channel: only its own activation block gets coarser
    ref = x @ deq.T
    y = Int2Linear(lib, q, s, mn, group)(x)
    assert y.shape == (m, rows)
    rel = ((y - ref).abs().max() / ref.abs().max()).item()
    assert rel < 5e-4, f"{rows}x{cols} g{group} M={m}: relative error {rel:.2e}"
    # the fallback (no compiled kernel) is the reference itself
    assert torch.allclose(Int2Linear(None, q, s, mn, group)(x), ref, rtol=1e-5, atol=1e-4)


def test_int2_two_threads_same_result_and_3d_input(lib) -> None:
    from local_engine.quant import Int2Linear

    q, s, mn, _ = _int2(4000, 1024, 64, seed=9)  # 2 x 4000 x 1024 MACs: above the threading threshold
    lin = Int2Linear(lib, q, s, mn, 64)
    x = torch.randn(2, 1024)
    one, two = _on_one_and_two_threads(lin, x)
    assert torch.equal(one, two)
    y3 = lin(x.reshape(2, 1, 1024))
    assert y3.shape == (2, 1, 4000) and torch.equal(y3.reshape(2, 4000), one)


def test_int2_kernel_refuses_a_group_it_cannot_block(lib) -> None:
    from local_engine.quant import Int2Linear

    q, s, mn, _ = _int2(8, 64, 32, seed=1)
    with pytest.raises(RuntimeError, match="q2matmul failed with code -1"):
        Int2Linear(lib, q, s, mn, 48)(torch.randn(1, 64))  # 48: not a multiple of the 32-column block


@pytest.mark.parametrize("rows,cols,group", [(301, 96, 32), (37, 480, 96), (768, 320, 64)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_pack_int4_matches_dequantised_matmul(lib, rows: int, cols: int, group: int, m: int) -> None:
    from local_engine.formats.pack_quant import dequantize, quantize
    from local_engine.quant import GroupLinear

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + m))
    q, s = quantize(w, "int4", group)
    ref_w = dequantize(q, s, "int4", (rows, cols))
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(3))
    x[:, 9] *= 60.0
    ref = x @ ref_w.T
    lin = GroupLinear(lib, "int4", q, s, None, group)
    assert lin._fn is not None
    rel = ((lin(x) - ref).abs().max() / ref.abs().max()).item()
    assert rel < 5e-4, f"int4 {rows}x{cols} g{group} M={m}: relative error {rel:.2e}"
    # a group the kernel cannot block (16): dequantised per call, same answer
    q16, s16 = quantize(w, "int4", 16)
    small = GroupLinear(lib, "int4", q16, s16, None, 16)
    assert small._fn is None
    assert torch.allclose(small(x), x @ dequantize(q16, s16, "int4", (rows, cols)).T, rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------- several activation rows

def _linear(lib, fmt: str, rows: int, cols: int, seed: int):
    """A kernel-backed matrix of format ``fmt`` and its dequantised weights."""
    from local_engine.formats.pack_quant import dequantize, quantize
    from local_engine.quant import GroupLinear, Int2Linear

    if fmt in ("Q4_0", "Q4_1", "Q8_0"):
        raw, deq = _blocks(fmt, rows, cols, seed)
        return GGUFBlockLinear.from_raw(lib, [raw]), deq
    if fmt == "int2":
        q, s, mn, deq = _int2(rows, cols, 64, seed)
        return Int2Linear(lib, q, s, mn, 64), deq
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q, s = quantize(w, "int4", 32)
    return GroupLinear(lib, "int4", q, s, None, 32), dequantize(q, s, "int4", (rows, cols))


# A speculative verify multiplies k+1 rows at once: each weight row is unpacked once for all of
# them (2x4 tiles with a cross-lane reduction, then 3/2/1-row remainders). Every M from 1 to 16
# must give each row what the reference gives it, and what the single-row (decode step) path
# gives it up to float summation order: the verify's greedy choices are compared with the step's.
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "int2", "int4"])
def test_every_row_count_matches_reference_and_single_rows(lib, fmt: str) -> None:
    lin, deq = _linear(lib, fmt, 37, 320, seed=11)  # 37 rows: 2-row tiles and a 1-row remainder
    x = torch.randn(16, 320, generator=torch.Generator().manual_seed(4))
    x[:, 3] *= 60.0
    single = torch.cat([lin(x[i:i + 1]) for i in range(16)])
    every = torch.cat([lin(x[:16]), lin(x[13:16])])  # rows 13..15 again: a 3-row remainder tile
    assert torch.equal(every[13:16], every[16:])
    for m in range(1, 17):
        y = lin(x[:m])
        ref = x[:m] @ deq.T
        rel = ((y - ref).abs().max() / ref.abs().max()).item()
        assert rel < 5e-4, f"{fmt} M={m}: relative error {rel:.2e} against the dequantised matmul"
        drift = ((y - single[:m]).abs().max() / single[:m].abs().max()).item()
        assert drift < 2e-6, f"{fmt} M={m}: rows differ from the single-row path by {drift:.2e}"
        if m > 1:  # a row's result does not depend on the batch: full tiles and remainders agree bitwise
            assert torch.equal(y, every[:m]), f"{fmt} M={m}: a row changed with the number of rows"


@pytest.mark.parametrize("m", [2, 9])
def test_several_rows_fused_norm_and_residual(lib, m: int) -> None:
    # the verify path's call: RMSNorm folded into the activation pass, the result added into x
    lin, deq = _linear(lib, "Q4_1", 96, 576, seed=12)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(5))
    norm = torch.rand(576) + 0.5
    base = torch.randn(m, 96)
    out = base.clone()
    lin.fused(x, norm, 1e-5, out=out)
    h = torch.nn.functional.rms_norm(x, (576,), norm, 1e-5)
    ref = base + h @ deq.T
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-4
    rows = torch.cat([lin.fused(x[i:i + 1].contiguous(), norm, 1e-5, out=base[i:i + 1].clone()) for i in range(m)])
    assert ((out - rows).abs().max() / rows.abs().max()).item() < 2e-6


def test_several_rows_with_a_long_row(lib) -> None:
    # K = 8224: 257 blocks per row, past the unpack buffer kept on the stack (heap path)
    lin, deq = _linear(lib, "Q8_0", 20, 8224, seed=13)
    x = torch.randn(5, 8224, generator=torch.Generator().manual_seed(6))
    ref = x @ deq.T
    assert ((lin(x) - ref).abs().max() / ref.abs().max()).item() < 5e-4


# The VNNI build (VPDPWSSD: the several-row tiles' multiply-adds in one instruction, and 5+ rows in
# groups of 8 with the activations transposed) against the portable AVX2 build: integer block sums
# are exact and every float operation per pair is the same, so every output is bitwise equal.
@pytest.mark.skipif(not qkernel.vnni_available(), reason="this CPU has neither AVX-VNNI nor AVX512-VNNI+VL")
@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0", "int2", "int4"])
def test_vnni_build_equals_avx2_build_bitwise(fmt: str) -> None:
    vnni, avx2 = qkernel.build(), qkernel.build(vnni=False)
    assert vnni._name != avx2._name  # two builds, not the cached one twice
    a, _ = _linear(vnni, fmt, 37, 576, seed=14)  # 37 rows: 4-row tiles and 1-row remainders
    b, _ = _linear(avx2, fmt, 37, 576, seed=14)
    x = torch.randn(21, 576, generator=torch.Generator().manual_seed(7))
    x[:, 3] *= 60.0
    for m in [*range(1, 18), 21]:  # 9-16: two groups of 8, the second short; 17, 21: a last group of 1 / 5
        assert torch.equal(a(x[:m]), b(x[:m])), f"{fmt} M={m}: the VNNI build differs from the AVX2 build"
    if fmt in ("Q4_1", "Q8_0"):  # the step's call: RMSNorm folded in, the result added into a residual
        norm, base = torch.rand(576) + 0.5, torch.randn(8, 37)
        ya, yb = base.clone(), base.clone()
        a.fused(x[:8], norm, 1e-5, out=ya)
        b.fused(x[:8], norm, 1e-5, out=yb)
        assert torch.equal(ya, yb)



# --------------------------------------------------------------------------- one token through an expert

def _expert(bits: int, hidden: int, inter: int, group: int, seed: int):
    """A grouped expert's bundle (gate_up [2I, H] then down [H, I], each part at its offset, as
    ``formats.pack`` lays them out), its ``GroupExpert`` and its dequantised weights."""
    from local_engine.formats.pack_quant import dequantize, quantize
    from local_engine.quant import GroupExpert

    gen = torch.Generator().manual_seed(seed)
    buf, offsets, deq = bytearray(), {}, {}
    for name, shape in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
        w = torch.randn(shape, generator=gen) * 0.05
        if bits == 2:
            q, s, mn, d = _int2(*shape, group, seed=seed + shape[0])
            parts = {name: q, f"{name}.scale": s, f"{name}.min": mn}
        else:
            q, s = quantize(w, "int4", group)
            d = dequantize(q, s, "int4", shape)
            parts = {name: q, f"{name}.scale": s}
        deq[name] = d
        for part, t in parts.items():
            offsets[part] = len(buf)
            buf += t.contiguous().view(torch.uint8).numpy().tobytes()
    return (GroupExpert(qkernel.load(), "int2" if bits == 2 else "int4", offsets, hidden, inter, group), buf,
            deq["gate_up"], deq["down"])


def _int8_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as the one-token expert path sees it: int8 codes per group (scale amax / 127, ties to even)."""
    g = x.reshape(-1, group)
    amax = g.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / 127.0)).reshape(-1)


def _expert_ref(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, w: float,
                group: int | None = None) -> torch.Tensor:
    """w * down(silu(g) * u), [g; u] = gate_up x, in float64; with ``group`` each matmul's input
    quantised as the kernel quantises it (so only float rounding differs)."""
    q = (lambda v: _int8_groups(v.float(), group).double()) if group else (lambda v: v.double())
    g, u = (gate_up.double() @ q(x)).chunk(2)
    return (w * (down.double() @ q(torch.nn.functional.silu(g) * u))).float()


# The one-token expert path quantises its activations to int8 per group (the other paths: int16
# per block of 32), so against the float reference it is only as close as int8 allows: ~1e-2 of
# the output's largest value here, ~4e-2 where an outlier channel coarsens its group's grid (the
# int16 paths: ~5e-5). Against a reference that quantises the same way it is exact up to float
# rounding (~5e-7 here: the seeds are fixed, so a code rounded the other way would show as ~1e-3).
# Odd group counts, groups of one block and of three (an odd block per group), a group as wide
# as the row, the benchmark model's shape (768 x 320, groups of 64), and a row of 65 groups (past
# the 64 a tile converts at a time, and past the 4096 columns kept on the stack: the heap path).
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("hidden,inter,group", [(768, 320, 64), (96, 64, 32), (288, 96, 96), (320, 192, 64),
                                                (128, 128, 128), (2048, 768, 64), (4160, 64, 64)])
def test_gq_expert_matches_float_reference(bits: int, hidden: int, inter: int, group: int) -> None:
    ex, buf, gate_up, down = _expert(bits, hidden, inter, group, seed=hidden + inter + bits)
    gen = torch.Generator().manual_seed(3)
    for outlier, bound in ((1.0, 2.5e-2), (40.0, 6e-2)):  # an outlier channel coarsens only its own group
        x = torch.randn(hidden, generator=gen)
        x[7] *= outlier
        y = torch.empty(hidden)
        ex(buf, x, 0.3, y)
        scale = _expert_ref(gate_up, down, x, 0.3).abs().max()
        rel = ((y - _expert_ref(gate_up, down, x, 0.3)).abs().max() / scale).item()
        assert rel < bound, f"int{bits} {hidden}x{inter} g{group} outlier {outlier}: relative error {rel:.2e}"
        rel8 = ((y - _expert_ref(gate_up, down, x, 0.3, group)).abs().max() / scale).item()
        assert rel8 < 1e-5, f"int{bits} {hidden}x{inter} g{group}: {rel8:.2e} from the int8-activation reference"
        # the same call again: nothing depends on what the buffers held before
        y2 = torch.empty(hidden)
        ex(buf, x, 0.3, y2)
        assert torch.equal(y, y2)


def test_gq_expert_refuses_a_group_it_cannot_block(lib) -> None:
    ex, buf, _, _ = _expert(4, 96, 64, 32, seed=1)
    ex.group = 48  # not a multiple of the 32-column block
    with pytest.raises(RuntimeError, match="gq_expert failed with code -1"):
        ex(buf, torch.randn(96), 1.0, torch.empty(96))


# The one-token expert path's VPDPBUSD against its maddubs + madd emulation in the AVX2 build.
@pytest.mark.skipif(not qkernel.vnni_available(), reason="this CPU has neither AVX-VNNI nor AVX512-VNNI+VL")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("hidden,inter,group", [(768, 320, 64), (288, 96, 96), (96, 64, 32), (4160, 64, 64)])
def test_vnni_build_equals_avx2_build_bitwise_one_token_expert(bits: int, hidden: int, inter: int,
                                                                group: int) -> None:
    vnni, avx2 = qkernel.build(), qkernel.build(vnni=False)
    ex, buf, _, _ = _expert(bits, hidden, inter, group, seed=21)
    x = torch.randn(hidden, generator=torch.Generator().manual_seed(8))
    x[3] *= 60.0
    ya, yb = torch.empty(hidden), torch.empty(hidden)
    ex._fn = vnni.gq_expert
    ex(buf, x, 0.7, ya)
    ex._fn = avx2.gq_expert
    ex(buf, x, 0.7, yb)
    assert torch.equal(ya, yb), f"int{bits} {hidden}x{inter} g{group}: the VNNI build differs from the AVX2 build"
