"""Per-group quantisation round trip: every element within half a step of its group's scale."""

from __future__ import annotations

import pytest
import torch

from local_engine.formats.pack_quant import dequantize, quantize


@pytest.mark.parametrize("method,qmax", [("int8", 127), ("int4", 7)])
def test_round_trip_error_is_at_most_half_a_step(method: str, qmax: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.linspace(0.01, 3.0, 48)[:, None]  # rows of very different scale
    q, s = quantize(w, method, 32)
    assert s.shape == (48, 4)
    assert q.shape == ((48, 128) if method == "int8" else (48, 64))
    back = dequantize(q, s, method, (48, 128))
    step = s.float().repeat_interleave(32, dim=1)
    # |err| <= step/2, plus fp16 rounding of the scale times the largest code
    assert ((back - w).abs() <= step * 0.5 + 1e-3 * step * qmax).all()
    # extremes of each group are representable: max |w| maps to +-qmax
    assert (back.abs().reshape(48, 4, 32).amax(-1) > 0).all()
