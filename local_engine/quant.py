"""Linear layers over the weight representations we keep in memory.

Each is a callable ``[.., in] fp32 -> [.., out] fp32`` (the ``Linear`` of models/layers.py):

    DenseLinear   fp32 or bf16 weight (``F.linear``), optional bias
    Int4Linear    4-bit groups of 32 in PyTorch's CPU int4 packed layout
                  (``_weight_int4pack_mm_for_cpu``, as gpt-fast): GGUF Q4_0 / Q4_1 map onto it
                  exactly (w = (q - 8)·scale + zero), so nothing is re-quantised
    Int8Linear    int8 per output channel (``_weight_int8pack_mm``, bf16 activations)
    GroupLinear   the MoE pack's int2 (asymmetric) / int4 (symmetric) expert groups, multiplied
                  by local_engine.qkernel's q2matmul / q4smatmul from the read buffer
    F16Linear     fp16 weights, fp32 activations, fbgemm's packed fp16 GEMM: on this AVX2-only
                  CPU it beats the int4 kernel (which is compute-bound here) for decode and is
                  ~5x faster for prefill. fbgemm's dynamic *int8* linear was faster still but
                  quantises activations per tensor, and SmolLM2's outlier channels then wreck
                  the output (measured: top-1 agreement 0%), so it is not offered.

Matrices that share an input (q|k|v, gate|up) are fused by concatenating rows before packing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from local_engine import qkernel
from local_engine.formats.pack_quant import dequantize
from local_engine.store import RawTensor

INT4_GROUP = 32
_INNER_K_TILES = 2


class SizedLinear(Protocol):
    """What a loader keeps of any of the layers below: the callable and the bytes its weights hold."""

    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


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


class F16Linear:
    """fp16 weights with fp32 activations through fbgemm's packed fp16 GEMM (AVX2 + F16C)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(),
                                                              None if bias is None else bias.float())
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class Int8Linear:
    """Symmetric int8 per output row, computed from a float weight."""

    def __init__(self, weight: torch.Tensor | Iterable[torch.Tensor], bias: torch.Tensor | None = None,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        # quantise in row chunks: a 49k-row vocab head in fp32 is 113 MB, and doing it in one go
        # made the transient copies the peak RSS of the whole engine
        chunks = weight.split(4096) if isinstance(weight, torch.Tensor) else weight
        w8s, scales = [], []
        for c in chunks:
            w = c.float()
            sc = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            w8s.append(torch.round(w / sc[:, None]).clamp(-127, 127).to(torch.int8))
            scales.append(sc)
        self.w8 = torch.cat(w8s).contiguous()
        self.scale = torch.cat(scales).to(act_dtype)
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


def _kernel_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the [M, in] contiguous fp32 rows the C kernels read (``x`` itself, reshaped, when it is)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    return x2


class GGUFBlockLinear:
    """GGUF Q4_0 / Q4_1 / Q8_0 blocks kept as they are, multiplied by local_engine.qkernel (AVX2).

    Activations are quantised to int8 per block of 32 inside the kernel (as llama.cpp does);
    the output is fp32. Q4_0 blocks are rewritten once as Q4_1 (m = -8 d, exact) so the kernel
    has one 4-bit path. ``blocks`` may be a read-only memory map (the tied vocab head of a GGUF
    is multiplied straight from the file, no copy).
    """

    def __init__(self, lib: object, blocks: np.ndarray, qtype: str, shape: tuple[int, int],
                 bias: torch.Tensor | None = None) -> None:
        rows, cols = shape
        if qtype == "Q4_0":
            blocks, qtype = _q4_0_as_q4_1(blocks, rows, cols), "Q4_1"
        if qtype not in ("Q4_1", "Q8_0"):
            raise ValueError(f"GGUFBlockLinear: unsupported block type {qtype}")
        self.blocks = np.ascontiguousarray(blocks)  # a no-op for a contiguous memmap
        self.qtype = qtype
        self._qt = qkernel.QTYPE_Q4_1 if qtype == "Q4_1" else qkernel.QTYPE_Q8_0
        self._fn = lib.qmatmul  # type: ignore[attr-defined]
        self._ptr = self.blocks.ctypes.data
        self.out_features, self.in_features = rows, cols
        self.bias = None if bias is None else bias.float()
        self.nbytes = self.blocks.nbytes

    @classmethod
    def from_raw(cls, lib: object, parts: Sequence[RawTensor], bias: torch.Tensor | None = None) -> GGUFBlockLinear:
        qtypes = {p.qtype for p in parts}
        if len(qtypes) != 1:
            raise ValueError(f"GGUFBlockLinear: mixed block types {sorted(qtypes)}")
        # fused q|k|v or gate|up: rows concatenated (one copy); a single matrix is used in place
        data = parts[0].data if len(parts) == 1 else np.concatenate([p.data for p in parts])
        rows = sum(p.shape[0] for p in parts)
        return cls(lib, data, parts[0].qtype, (rows, parts[0].shape[1]), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = _kernel_rows(x)
        m = x2.shape[0]
        y = torch.empty(m, self.out_features)
        self._run(x2, y, m, None, 0.0, 0)
        if len(shape) != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def fused(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """``rms_norm(x, norm, eps) @ W.T`` in one call; with ``out``, added into it (a residual).

        For the decode step: x [M, in] fp32 contiguous, norm fp32 contiguous; no bias added.
        """
        m = x.shape[0]
        if out is None:
            y, add = torch.empty(m, self.out_features), 0
        else:
            y, add = out, 1
        self._run(x, y, m, norm, eps, add)
        return y

    def _run(self, x: torch.Tensor, y: torch.Tensor, m: int, norm: torch.Tensor | None, eps: float,
             add: int) -> None:
        rc = self._fn(self._ptr, self._qt, x.data_ptr(), y.data_ptr(), m, self.out_features, self.in_features,
                      torch.get_num_threads(), None if norm is None else norm.data_ptr(), eps, add)
        if rc != 0:
            raise RuntimeError(f"qkernel failed with code {rc} for a {self.out_features}x{self.in_features} matrix")


class GroupLinear:
    """A pack's grouped expert matrix multiplied by ``qkernel`` straight from its bytes.

    ``method`` "int2": ``q`` uint8 [out, in/4], ``scale`` / ``mins`` fp16 [out, in/group]
    (layout: ``formats.pack_quant.quantize_int2``; ``qkernel.q2matmul``). "int4": the pack's symmetric
    nibbles, ``q`` uint8 [out, in/2], ``scale`` fp16, no mins (``qkernel.q4smatmul``). The tensors
    may be zero-copy views over a read buffer (a streamed expert): nothing is converted or
    copied. Without the compiled kernel (``lib`` None), or with a group the kernel cannot block
    (not a multiple of 32), the matrix is dequantised to fp32 per call.
    """

    def __init__(self, lib: object | None, method: str, q: torch.Tensor, scale: torch.Tensor,
                 mins: torch.Tensor | None, group: int) -> None:
        per_byte = {"int2": 4, "int4": 2}[method]
        self.out_features, self.in_features = q.shape[0], q.shape[1] * per_byte
        if scale.dtype != torch.float16 or q.dtype != torch.uint8 or (method == "int2") != (mins is not None):
            raise ValueError(f"GroupLinear {method}: q must be uint8, scale fp16, and mins fp16 for int2 only")
        if mins is not None and mins.dtype != torch.float16:
            raise ValueError("GroupLinear: mins must be fp16")
        self.method, self.q, self.scale, self.mins, self.group = method, q, scale, mins, group
        fn = None
        if lib is not None and (method == "int2" or group % 32 == 0):
            fn = lib.q2matmul if method == "int2" else lib.q4smatmul  # type: ignore[attr-defined]
        self._fn = fn
        self.nbytes = q.numel() + scale.numel() * 2 * (2 if mins is not None else 1)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.method, (self.out_features, self.in_features), self.mins)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            return F.linear(x.float(), self.dequantize())
        shape = x.shape
        x2 = _kernel_rows(x)
        m = x2.shape[0]
        y = torch.empty(m, self.out_features)
        head: tuple[int, ...] = (self.q.data_ptr(), self.scale.data_ptr())
        if self.mins is not None:
            head = (*head, self.mins.data_ptr())
        rc = self._fn(*head, self.group, x2.data_ptr(), y.data_ptr(), m, self.out_features, self.in_features,
                      torch.get_num_threads())
        if rc != 0:
            name = "q2matmul" if self.method == "int2" else "q4smatmul"
            raise RuntimeError(f"qkernel {name} failed with code {rc} for a {self.out_features}x"
                               f"{self.in_features} matrix, group {self.group}")
        return y if len(shape) == 2 else y.reshape(*shape[:-1], self.out_features)


class Int2Linear(GroupLinear):
    """2-bit asymmetric groups (``pack --quant int2`` experts), ``qkernel.q2matmul``."""

    def __init__(self, lib: object | None, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
                 group: int) -> None:
        super().__init__(lib, "int2", q, scale, mins, group)


def _q4_0_as_q4_1(blocks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 (fp16 d, 16 bytes) -> Q4_1 (fp16 d, fp16 m = -8 d, same 16 bytes): w = d q - 8 d."""
    nb = cols // 32
    b = np.asarray(blocks).reshape(rows, nb, 18)
    out = np.empty((rows, nb, 20), dtype=np.uint8)
    out[:, :, 0:2] = b[:, :, 0:2]
    d = b[:, :, 0:2].copy().view(np.float16)
    out[:, :, 2:4] = (d.astype(np.float32) * -8.0).astype(np.float16).view(np.uint8)
    out[:, :, 4:20] = b[:, :, 2:18]
    return out.reshape(rows, nb * 20)


class GroupExpert:
    """One streamed expert's SwiGLU for one token, ``qkernel.gq_expert``, straight from a bundle.

    The decode step's fast path (``MoEModel._moe`` with one token): where ``GroupLinear`` builds
    two matrices of tensor views per bundle and runs the expert as a dozen PyTorch calls, this
    knows where each part sits in every bundle (``offsets``: byte offsets of gate_up, its scale,
    its min, down, its scale, its min; the mins 0 for int4) and makes one call per expert. Its
    activations are int8 per group (the matrices' int16 per block of 32): see qkernel's docstring.
    """

    _PARTS = ("gate_up", "gate_up.scale", "gate_up.min", "down", "down.scale", "down.min")

    def __init__(self, lib: object, method: str, offsets: dict[str, int], hidden: int, inter: int,
                 group: int) -> None:
        if method not in ("int2", "int4"):
            raise ValueError(f"GroupExpert: {method} experts are not grouped int2 / int4")
        self.bits = 2 if method == "int2" else 4
        self._fn = lib.gq_expert  # type: ignore[attr-defined]
        self._off = [offsets.get(p, -1) for p in self._PARTS]
        self.hidden, self.inter, self.group = hidden, inter, group

    def __call__(self, buf: object, x: torch.Tensor, w: float, y: torch.Tensor) -> None:
        """``y`` [hidden] = w · down(silu(g) · u) of the bundle in ``buf`` (a writable buffer)
        for ``x`` [hidden] (fp32, contiguous)."""
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]
        p = [base + o if o >= 0 else None for o in self._off]
        rc = self._fn(self.bits, *p, self.group, x.data_ptr(), self.hidden, self.inter, w, y.data_ptr())
        if rc != 0:
            raise RuntimeError(f"qkernel gq_expert failed with code {rc} (hidden {self.hidden}, "
                               f"intermediate {self.inter}, group {self.group})")
