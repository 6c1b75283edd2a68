"""The pack format's quantisation: the experts' group codes and the dense matrices' GGUF blocks.

Experts (``quant``: ``int8`` / ``int4``) are quantised symmetrically, per group of ``group_size``
consecutive input columns, one fp16 scale per (row, group); ``int4`` packs two values per byte
(low nibble first). ``int2`` is asymmetric (an fp16 scale *and* min per (row, group),
w = q·scale + min, q in 0..3), four values per byte in blocks of 32 columns (see
``quantize_int2``), and needs a group size that is a multiple of 32 (the kernel's activation
block). ``none`` copies the source dtype bit for bit.

Dense weights (``dense``: ``f32`` | ``int8`` | ``int4``): which resident matrices are stored as
GGUF ``Q8_0`` / ``Q4_1`` blocks (``dense_quantisable``) and their quantiser; why, in
``formats/pack.py``'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from local_engine.errors import PackError

QUANT_METHODS = ("none", "int8", "int4", "int2")
# dense (resident, read-every-token) matrices: lossless, or the GGUF block type qkernel multiplies
DENSE_METHODS = ("f32", "int8", "int4")
DENSE_QTYPES = {"int8": "Q8_0", "int4": "Q4_1"}
DENSE_BLOCK = 32  # columns per GGUF Q8_0 / Q4_1 block
INT2_BLOCK = 32  # columns per int2 packing block (and qkernel's activation block)


def quantize(w: torch.Tensor, method: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group quantisation of a 2-D weight along its input (last) dim.

    Returns (q, scales): int8 [out, in] or uint8 nibble-packed [out, in/2]; fp16 scales
    [out, in/group]. Scales are computed in fp32 then stored fp16; the quantised values are
    rounded against the *stored* fp16 scale so dequantisation matches what was optimised.
    """
    out_f, in_f = w.shape
    if in_f % group:
        raise PackError(f"input dim {in_f} is not a multiple of group size {group}")
    qmax = 127.0 if method == "int8" else 7.0
    g = w.float().reshape(out_f, in_f // group, group)
    scale = (g.abs().amax(dim=-1) / qmax).clamp_min(1e-12).to(torch.float16)
    s32 = scale.float().clamp_min(1e-12).unsqueeze(-1)
    if method == "int8":
        q = torch.round(g / s32).clamp(-127, 127).to(torch.int8).reshape(out_f, in_f)
    else:
        q = (torch.round(g / s32).clamp(-8, 7) + 8).to(torch.uint8).reshape(out_f, in_f)
        q = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return q, scale


def quantize_int2(w: torch.Tensor, group: int, refine: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 2-bit per-group quantisation: w ~ q·scale + min, q in {0, 1, 2, 3}.

    Why asymmetric: with only four levels, a symmetric grid either has no zero ({±0.5, ±1.5}·s)
    or one level fewer on one side ({-2..1}·s), and it always spans [-max|w|, max|w|], so a
    group whose values are skewed leaves part of the grid unused; [min, max] puts all four
    levels on the values the group has (one lost level is 1/16 of an int4 grid, 1/4 of int2's).
    Every symmetric 4-level grid is one of these (min = -2·scale or -1.5·scale), so a fitted
    asymmetric grid is never worse; it costs one more fp16 per group (+0.25 bit/weight at 64).
    Measured: on SmolLM2's matrices and Gaussian rows the refined fit matches the best symmetric
    scale found by a per-group search (within 0.5% RMS; min/max alone is 1.37x worse), on groups
    whose values sit off zero it is clearly better (tests/moe/test_int2.py).

    Start from the group's [min, max], then ``refine`` rounds of least-squares (scale, min) for
    the current codes and re-rounding, keeping per group the candidate with the smallest error
    (as llama.cpp's ``make_qkx`` does for Q2_K). Codes are rounded against the *stored* fp16
    scale and min, so dequantisation reproduces what was chosen.

    Returns (q uint8 [out, in/4], scale fp16 [out, in/group], min fp16 [out, in/group]). Byte
    layout: in each block of 32 columns, byte j holds columns j, j+8, j+16, j+24 in bits 0-1,
    2-3, 4-5, 6-7, so the kernel unpacks a block with three shifts and four masks.
    """
    out_f, in_f = w.shape
    if in_f % group or group % INT2_BLOCK:
        raise PackError(f"int2: input dim {in_f} and group size {group} must be multiples of {INT2_BLOCK} "
                        f"with the group size dividing the input dim")
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    cands = [((hi - lo) / 3.0, lo)]
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # codes, scale, min, error
    for it in range(refine + 1):
        s, m = cands[-1]
        s16 = s.clamp_min(0).to(torch.float16)
        m16 = m.to(torch.float16)
        s32, m32 = s16.float().unsqueeze(-1), m16.float().unsqueeze(-1)
        q = torch.round((g - m32) / s32.clamp_min(1e-12)).clamp(0, 3)
        err = ((q * s32 + m32 - g) ** 2).sum(-1)
        if best is None:
            best = (q, s16, m16, err)
        else:
            better = err < best[3]
            best = (torch.where(better.unsqueeze(-1), q, best[0]), torch.where(better, s16, best[1]),
                    torch.where(better, m16, best[2]), torch.where(better, err, best[3]))
        if it == refine:
            break
        # least squares for (s, m) given the codes: [sum q², sum q; sum q, n] [s; m] = [sum qw; sum w]
        n = float(group)
        sq, sqq = q.sum(-1), (q * q).sum(-1)
        sw, sqw = g.sum(-1), (q * g).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        s_new = torch.where(ok, (n * sqw - sq * sw) / torch.where(ok, det, torch.ones_like(det)), s)
        m_new = torch.where(ok, (sw - s_new * sq) / n, m)
        cands.append((s_new, m_new))
    assert best is not None  # the loop runs at least once
    best_q, best_s, best_m, _ = best
    codes = best_q.to(torch.uint8).reshape(out_f, in_f // INT2_BLOCK, 4, INT2_BLOCK // 4)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    return packed.reshape(out_f, in_f // 4).contiguous(), best_s, best_m


def unpack_int2(q: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The codes (uint8 0..3, [out, in]) of an int2-packed matrix (layout: ``quantize_int2``)."""
    out_f, in_f = shape
    b = q.reshape(out_f, in_f // INT2_BLOCK, 1, INT2_BLOCK // 4)
    return torch.cat([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(out_f, in_f)


def _group_size_ok(quant: str, size: int) -> bool:
    if quant == "int4":
        return size % 2 == 0
    if quant == "int2":
        return size % INT2_BLOCK == 0
    return True


def valid_group_size(quant: str, dims: Iterable[int], at_most: int) -> int | None:
    """The largest group size <= ``at_most`` that divides every dim (even for int4, a multiple
    of 32 for int2), or None."""
    g = math.gcd(*dims)
    for size in range(min(at_most, g), 0, -1):
        if g % size == 0 and _group_size_ok(quant, size):
            return size
    return None


def check_group_size(quant: str, group_size: int, dims: dict[str, int]) -> None:
    """Refuse a group size the expert matrices cannot be cut into, naming the option and a value that works."""
    bad = [f"{name} {d}" for name, d in dims.items() if group_size < 1 or d % group_size]
    if quant == "int4" and group_size % 2:
        bad.append("int4 (two values per byte: the group size must be even)")
    if quant == "int2" and group_size % INT2_BLOCK:
        bad.append(f"int2 (four values per byte in blocks of {INT2_BLOCK} columns: the group size must be "
                   f"a multiple of {INT2_BLOCK})")
    if not bad:
        return
    at_most = max(group_size, INT2_BLOCK if quant == "int2" else 1) if group_size >= 1 else 64
    fix = valid_group_size(quant, dims.values(), at_most)
    kind = f"multiple of {INT2_BLOCK}" if quant == "int2" else "size"
    hint = (f"use --group-size {fix} (group_size={fix}): the largest {kind} up to {at_most} that divides "
            f"{' and '.join(str(d) for d in dims.values())}" if fix else
            "no group size fits; use --quant int8 or --quant none" if quant != "int2" else
            f"no group size fits (int2 needs widths that a multiple of {INT2_BLOCK} divides); "
            "use --quant int4, int8 or none")
    raise PackError(f"--quant {quant} --group-size {group_size}: does not fit {', '.join(bad)}: {hint}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, method: str, shape: tuple[int, int],
               mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [out, in] from (q, scale) (and, for int2, the per-group ``mins``)."""
    out_f, in_f = shape
    if method == "int2":
        if mins is None:
            raise PackError("int2 dequantisation needs the per-group mins")
        ng = scale.shape[1]
        codes = unpack_int2(q, shape).reshape(out_f, ng, in_f // ng).to(torch.float32)
        w = codes * scale.to(torch.float32).unsqueeze(-1) + mins.to(torch.float32).unsqueeze(-1)
        return w.reshape(out_f, in_f)
    if method == "int4":
        lo = (q & 0x0F).to(torch.int8) - 8
        hi = (q >> 4).to(torch.int8) - 8
        vals = torch.stack((lo, hi), dim=-1).reshape(out_f, in_f)
    else:
        vals = q
    ng = scale.shape[1]
    w = vals.reshape(out_f, ng, in_f // ng).to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f)


def dense_quantisable(name: str, t: torch.Tensor) -> bool:
    """Whether ``pack --dense int8|int4`` stores this resident tensor as GGUF blocks: the
    projection matrices every token reads in full (attention q/k/v/o, shared experts, dense MLP
    layers: ``*_proj.weight``) and the vocab head, when their width is whole blocks. Routers
    (``gate.weight``), norms and the embedding table stay lossless."""
    return (t.dim() == 2 and t.is_floating_point() and t.shape[1] % DENSE_BLOCK == 0
            and (name.endswith("_proj.weight") or name == "lm_head.weight"))


def quantize_dense(w: torch.Tensor, dense: str) -> torch.Tensor:
    """``w`` [rows, cols] as rows of GGUF blocks (uint8 [rows, bytes per row]): Q8_0 for int8,
    Q4_1 for int4, written by the ``gguf`` package's reference quantiser (what llama.cpp's
    converter writes), so ``qkernel.qmatmul`` multiplies them as it does a GGUF file's."""
    import gguf

    qt = gguf.GGMLQuantizationType[DENSE_QTYPES[dense]]
    return torch.from_numpy(gguf.quants.quantize(w.float().numpy(), qt))
