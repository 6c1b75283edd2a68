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
        qkernel._build()


def test_compiler_error_is_reported(monkeypatch, tmp_path) -> None:
    # a broken compiler must give a reason (then the model falls back to PyTorch), not a crash
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: no such thing' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("LOCAL_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="no such thing"):
        qkernel._build()


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
    from local_engine.formats.pack import dequantize, quantize_int2

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
    from local_engine.formats.pack import dequantize, quantize
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
