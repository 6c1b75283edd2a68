"""Reusable transformer blocks for the CPU engine (dense Llama family and the MoE models).

Stable API (other model files import these; change only by adding):

Shapes: one sequence at a time, no batch dim. ``x`` is ``[T, d_model]``; heads are ``[H, T, Dh]``.

    Linear                      anything callable ``[.., in] -> [.., out]`` (a ``torch.Tensor`` weight
                                ``[out, in]`` is accepted too); see ``local_engine.quant`` for the
                                dense / int8 / int4 implementations.
    linear(x, w)                apply a Linear or a raw weight tensor.
    rms_norm(x, weight, eps)    RMSNorm over the last dim, computed in fp32 like HF.
    rope_inv_freq(head_dim, theta, scaling=None, max_position=None, freq_factors=None)
                                -> (inv_freq [Dh/2], attention_factor). ``scaling`` is an HF
                                ``rope_scaling`` dict: rope_type/type in {default, linear, dynamic
                                (treated as default below its original length), llama3, yarn}.
    RopeTables(inv_freq, max_pos, attention_factor=1.0)
                                precomputed cos/sin ``[max_pos, Dh]`` (HF "rotate_half" layout);
                                ``.apply(x [H,T,Dh], start)`` rotates positions start..start+T-1.
    KVCache(n_layers, n_kv_heads, head_dim, max_seq, dtype=float32)
                                preallocated (``.kv [L, 2*Hkv, max_seq, Dh]``, K heads then V heads;
                                ``.k`` / ``.v`` are views of it); ``.update(layer, k, v, start) -> (k_all, v_all)``
                                writes ``[Hkv, T, Dh]`` at ``start`` and returns views up to
                                ``start+T``; ``.length`` is set by the caller via ``.advance(T)``
                                once all layers ran; ``.reset()``, ``.crop(n)``.
                                Any other ``cache`` (``Attends``: local_engine/kv_cache.py's
                                compressed / bounded one) is handed the unrotated q/k/v.
    attention(x, *, layer, start, wq, wk, wv, wo, n_heads, n_kv_heads, head_dim, rope, cache,
              q_norm=None, k_norm=None, eps=1e-6, wqkv=None)
                                GQA self-attention with causal mask (batched prefill when T > 1,
                                single-token decode when T == 1). Pass either a fused ``wqkv``
                                (output rows q|k|v) or ``wq, wk, wv``. ``q_norm``/``k_norm`` are
                                per-head RMSNorm weights ``[Dh]`` (Qwen3), applied before RoPE.
    swiglu(x, w_gate, w_up, w_down, w_gate_up=None)
                                ``down(silu(gate(x)) * up(x))``; ``w_gate_up`` is a fused Linear
                                whose output is gate|up (then w_gate/w_up may be None).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from local_engine.errors import ContextOverflow

Linear = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
# Query rows per attention call in a prefill, cut at multiples of it by absolute position
# (``prefill_attention``): the prefix cache reuses K/V up to a multiple of it, so a hit computes
# each new row in the very call a fresh run does. A chunk (models' ``prefill_chunk``) is a multiple.
ATTN_GROUP = 32


def linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return w(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op: decode is op-count bound
    # fp32 accumulate, like HF's LlamaRMSNorm, so bf16 activations do not drift.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype) if weight.dtype == x.dtype else (weight.float() * xf).to(x.dtype)


# ----------------------------------------------------------------------------------- RoPE


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, s: dict[str, Any],
          max_position: int | None) -> tuple[torch.Tensor, float]:
    factor = float(s["factor"])
    orig = int(s.get("original_max_position_embeddings") or max_position or 4096)
    beta_fast = float(s.get("beta_fast") or 32)
    beta_slow = float(s.get("beta_slow") or 1)
    mscale = s.get("mscale")
    mscale_all = s.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("attention_factor") is not None:
        att = float(s["attention_factor"])
    elif mscale and mscale_all:
        att = get_mscale(factor, float(mscale)) / get_mscale(factor, float(mscale_all))
    else:
        att = get_mscale(factor)

    def corr_dim(n_rot: float) -> float:
        return (head_dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low = math.floor(corr_dim(beta_fast)) if s.get("truncate", True) else corr_dim(beta_fast)
    high = math.ceil(corr_dim(beta_slow)) if s.get("truncate", True) else corr_dim(beta_slow)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    interp = inv_freq / factor
    return interp * (1 - extrapolation) + inv_freq * extrapolation, att


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                  max_position: int | None = None,
                  freq_factors: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention (cos/sin) factor, as HF's ROPE_INIT_FUNCTIONS."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:  # GGUF llama3-style models ship the scaling as a tensor
        inv = inv / freq_factors.float()
    if not scaling:
        return inv, 1.0
    kind = str(scaling.get("rope_type") or scaling.get("type") or "default")
    if kind == "default" or kind == "dynamic":
        # dynamic NTK only changes frequencies past the original length; we stay at default below it
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling.get("low_freq_factor", 1)), float(scaling.get("high_freq_factor", 4))
        old = float(scaling.get("original_max_position_embeddings", 8192))
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        return torch.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        return _yarn(inv, head_dim, theta, scaling, max_position)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RopeTables:
    def __init__(self, inv_freq: torch.Tensor, max_pos: int, attention_factor: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> None:
        t = torch.arange(max_pos, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * attention_factor).to(dtype)
        self.sin = (emb.sin() * attention_factor).to(dtype)
        half = emb.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin | sin]: 3 ops instead of 7 per call
        self._sin_signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)
        self.max_pos = max_pos
        # kept for positions past the table (a bounded KV cache runs on past max_pos, kv_cache.py)
        self.inv_freq, self.attention_factor = inv_freq, attention_factor

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        T = x.shape[-2]
        cos = self.cos[start:start + T]
        sin = self._sin_signed[start:start + T]
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


# ----------------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated per-layer K/V; the model never reallocates during decode."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_seq: int,
                 dtype: torch.dtype = torch.float32) -> None:
        # empty, not zeros: positions are written before they are read, and untouched pages of a
        # long context never become resident memory. K and V of a layer share one tensor (K heads,
        # then V heads) so a single-token step can write both with one copy (models/llama.py).
        self.kv = torch.empty(n_layers, 2 * n_kv_heads, max_seq, head_dim, dtype=dtype)
        self.k = self.kv[:, :n_kv_heads]
        self.v = self.kv[:, n_kv_heads:]
        self.n_kv_heads = n_kv_heads
        self.max_seq = max_seq
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        if end > self.max_seq:
            raise ContextOverflow(f"context length exceeded: {end} > {self.max_seq} tokens")
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    @property
    def bytes_per_token(self) -> int:
        return self.kv.shape[0] * self.kv.shape[1] * self.kv.shape[3] * self.kv.element_size()

    @property
    def reusable(self) -> bool:
        """Positions 0..length-1 hold the sequence (always: this cache never evicts)."""
        return True

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, n: int) -> None:
        self.length = min(self.length, n)

    def reset(self) -> None:
        self.length = 0


class Attends(Protocol):
    """A KV cache that attends itself (local_engine/kv_cache.py): ``attend(layer, q, k, v)`` takes
    the new tokens' unrotated ``q [H, T, Dh]``, ``k``/``v`` ``[Hkv, T, Dh]`` and returns ``[H, T, Dh]``."""

    length: int

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def advance(self, n: int) -> None: ...


# ----------------------------------------------------------------------------------- blocks


def _split_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int,
                 q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, heads * Dh] projections -> [heads, T, Dh], q and k RMS-normed per head where the model does."""
    T = q.shape[0]
    q = q.reshape(T, n_heads, head_dim).transpose(0, 1)
    k = k.reshape(T, n_kv_heads, head_dim).transpose(0, 1)
    v = v.reshape(T, n_kv_heads, head_dim).transpose(0, 1)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    return q, k, v


def attention(x: torch.Tensor, *, layer: int, start: int, wq: Linear | None, wk: Linear | None,
              wv: Linear | None, wo: Linear, n_heads: int, n_kv_heads: int, head_dim: int,
              rope: RopeTables, cache: KVCache | Attends, q_norm: torch.Tensor | None = None,
              k_norm: torch.Tensor | None = None, eps: float = 1e-6,
              wqkv: Linear | None = None) -> torch.Tensor:
    T = x.shape[0]
    nq, nk = n_heads * head_dim, n_kv_heads * head_dim
    if wqkv is not None:
        qkv = linear(x, wqkv)
        q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
    else:
        assert wq is not None and wk is not None and wv is not None
        q, k, v = linear(x, wq), linear(x, wk), linear(x, wv)
    if not isinstance(cache, KVCache):
        # a compressed / bounded cache (local_engine/kv_cache.py) owns positions and storage: it
        # rotates, stores and attends itself
        q, k, v = _split_heads(q, k, v, n_heads, n_kv_heads, head_dim, q_norm, k_norm, eps)
        out = cache.attend(layer, q, k, v)
        return linear(out.transpose(0, 1).reshape(T, nq).to(x.dtype), wo)
    if wqkv is not None and q_norm is None and k_norm is None:
        # rotate q and k heads together in one call (fewer ops per decode step)
        qk = rope.apply(qkv[:, :nq + nk].view(T, n_heads + n_kv_heads, head_dim).transpose(0, 1), start)
        q, k = qk[:n_heads], qk[n_heads:]
        v = v.view(T, n_kv_heads, head_dim).transpose(0, 1)
    else:
        q, k, v = _split_heads(q, k, v, n_heads, n_kv_heads, head_dim, q_norm, k_norm, eps)
        q = rope.apply(q, start)
        k = rope.apply(k, start)
    k_all, v_all = cache.update(layer, k.to(cache.k.dtype), v.to(cache.v.dtype), start)
    if k_all.dtype != q.dtype:
        k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
    g = n_heads // n_kv_heads
    if T == 1:
        # decode: q heads grouped under their kv head, two bmm's; SDPA's GQA path on CPU falls back
        # to the math kernel and materialises the expanded K/V (measured 5x slower here)
        qg = q.reshape(n_kv_heads, g, head_dim)
        att = torch.bmm(qg * (1.0 / math.sqrt(head_dim)), k_all.transpose(1, 2)).softmax(-1)
        out = torch.bmm(att, v_all).reshape(n_heads, 1, head_dim)
    else:
        if g > 1:
            k_all, v_all = k_all.repeat_interleave(g, 0), v_all.repeat_interleave(g, 0)
        out = prefill_attention(q, k_all, v_all, start)
    return linear(out.transpose(0, 1).reshape(T, nq), wo)


def group_cuts(start: int, end: int) -> list[int]:
    """``start``, the multiples of ``ATTN_GROUP`` between, ``end``: where a prefill's attention calls cut."""
    first = (start // ATTN_GROUP + 1) * ATTN_GROUP
    return [start, *range(first, end, ATTN_GROUP), end]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of ``q [H, T, Dh]`` (positions start..start+T-1) over ``k``/``v`` ``[H, start+T, Dh]``.

    One SDPA call per group of ``ATTN_GROUP`` positions (cut at multiples of it): a row's sums
    then come from the same call however the prompt was chunked or how much of it a prefix hit
    reused, so its logits are bitwise a fresh run's (SDPA's sums depend on the call's shape: a
    2-row call differed from a 145-row one by ~2e-7, which grew to ~5e-3 in the logits)."""
    T = q.shape[1]
    cuts = group_cuts(start, start + T)
    outs = []
    for a, b in itertools.pairwise(cuts):
        mask = torch.ones(b - a, b, dtype=torch.bool).tril(diagonal=a)
        outs.append(F.scaled_dot_product_attention(q[:, a - start:b - start], k[:, :b], v[:, :b], attn_mask=mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def swiglu(x: torch.Tensor, w_gate: Linear | None, w_up: Linear | None, w_down: Linear,
           w_gate_up: Linear | None = None) -> torch.Tensor:
    if w_gate_up is not None:
        gu = linear(x, w_gate_up)
        half = gu.shape[-1] // 2
        g, u = gu[..., :half], gu[..., half:]
    else:
        assert w_gate is not None and w_up is not None
        g, u = linear(x, w_gate), linear(x, w_up)
    return linear(F.silu(g) * u, w_down)
