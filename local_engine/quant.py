"""Linear layers over the weight representations we keep in memory.

Each is a callable ``[.., in] fp32 -> [.., out] fp32`` (the ``Linear`` of models/layers.py):

    DenseLinear   fp32 or bf16 weight (``F.linear``), optional bias
    Int4Linear    4-bit groups of 32 in PyTorch's CPU int4 packed layout
                  (``_weight_int4pack_mm_for_cpu``, as gpt-fast): GGUF Q4_0 / Q4_1 map onto it
                  exactly (w = (q - 8)·scale + zero), so nothing is re-quantised
    Int8Linear    int8 per output channel (``_weight_int8pack_mm``, bf16 activations)
    DynInt8Linear int8 per output channel, activations quantised to 8 bits per call (fbgemm's
                  dynamic quantised linear, like llama.cpp's Q8 activations for its Q4/Q8 dots).
                  On AVX2-only CPUs this is ~5x faster than the int4 kernel per weight, which
                  is why "auto" uses it for GGUF quantised tensors (re-quantised per row)

Matrices that share an input (q|k|v, gate|up) are fused by concatenating rows before packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from local_engine.store import RawTensor

INT4_GROUP = 32
_INNER_K_TILES = 2


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.weight = weight.to(dtype).contiguous()
        self.bias = None if bias is None else bias.to(dtype)
        self.dtype = dtype
        self.out_features, self.in_features = self.weight.shape
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)


def _q4_unpack(raw: RawTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGML Q4_0/Q4_1 blocks -> (q uint8 [rows, cols], scale f32 [rows, nb], zero f32 [rows, nb])."""
    rows, cols = raw.shape
    nb = cols // 32
    block = 18 if raw.qtype == "Q4_0" else 20
    b = raw.data.reshape(rows, nb, block)
    d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    if raw.qtype == "Q4_0":
        qs = b[:, :, 2:18]
        zero = np.zeros_like(d)  # w = d·(q − 8)
    else:
        m = b[:, :, 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
        qs = b[:, :, 4:20]
        zero = m + 8.0 * d  # w = d·q + m = d·(q − 8) + (m + 8d)
    # a block's byte j holds element j (low nibble) and element j+16 (high nibble)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    return q, d, zero


class Int4Linear:
    def __init__(self, q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                 bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16) -> None:
        rows, cols = q.shape
        self.out_features, self.in_features = rows, cols
        w = torch.from_numpy(q.astype(np.int32))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, _INNER_K_TILES)
        sz = np.stack([scale, zero], axis=-1).transpose(1, 0, 2)  # [n_groups, rows, 2]
        self.scales_zeros = torch.from_numpy(np.ascontiguousarray(sz)).to(act_dtype)
        self.bias = None if bias is None else bias.float()
        self.act_dtype = act_dtype
        self.nbytes = self.packed.numel() + self.scales_zeros.numel() * self.scales_zeros.element_size()

    @classmethod
    def from_raw(cls, parts: Sequence[RawTensor], bias: torch.Tensor | None = None,
                 act_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        qs, ss, zs = zip(*(_q4_unpack(p) for p in parts), strict=True)
        return cls(np.concatenate(qs), np.concatenate(ss), np.concatenate(zs), bias, act_dtype)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None,
                   act_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """Asymmetric 4-bit groups of 32 (min/max per group), like GGML Q4_1."""
        rows, cols = w.shape
        g = w.float().reshape(rows, cols // INT4_GROUP, INT4_GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(rows, cols)
        return cls(q.numpy(), scale.numpy(), (lo + 8.0 * scale).numpy(), bias, act_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.act_dtype), self.packed, INT4_GROUP,
                                                           self.scales_zeros).to(x.dtype)
        else:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(self.act_dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, INT4_GROUP, self.scales_zeros)
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class DynInt8Linear:
    """fbgemm dynamic int8 linear: int8 weights per row, uint8 activations per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        import warnings

        w = weight.float()
        rows, cols = w.shape
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated, the fbgemm op is not gone
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros(rows, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())
        self.out_features, self.in_features = rows, cols
        self.nbytes = rows * cols + rows * 8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations keep fbgemm's u8*s8 pair sums from saturating on AVX2
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


class Int8Linear:
    """Symmetric int8 per output row, computed from a float weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.w8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(act_dtype)
        self.bias = None if bias is None else bias.float()
        self.act_dtype = act_dtype
        self.out_features, self.in_features = self.w8.shape
        self.nbytes = self.w8.numel() + self.scale.numel() * self.scale.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.act_dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.w8, self.scale)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
