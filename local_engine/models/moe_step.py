"""The packed MoE model's one-token decode step over a plain KV cache, outside the experts.

Why: a warm int4@int8 decode token of the 24-layer benchmark model was ~28 ms, of which the experts
were 11; most of the rest was ~25 PyTorch dispatches a layer (RMSNorm, the q|k|v split, per-head
q/k norms, RoPE via roll/addcmul, the cache write, two bmm's and a softmax, the residual adds), at
1-18 us each on one row. The dense Llama model's step (models/llama.py) showed the way; this does
the same for ``MoEModel``:

- where the resident matrices are GGUF blocks (``pack --dense int8|int4``), the input RMSNorm is
  folded into the q|k|v matmul's activation pass (``GGUFBlockLinear.fused``), the o projection
  adds into the residual stream in place (``fused(out=x)``) and the final norm is folded into the
  vocab head's matmul; fp32 matrices (a lossless pack) write q, k and v side by side into one
  reused row (``torch.mm(out=)``) and the o projection adds in place (``addmm_``);
- Qwen3's per-head q/k norms are one C call (``norm_kernel.head_norms``), RoPE + the K/V write +
  attention over the cache another (``qkernel.attn_step_v``);
- the post-attention RMSNorm is one C call into a buffer reused by every layer, since the router
  (fp32) and the experts (``gq_expert``) take the normed row, not a norm to fold.

The experts, routing and prefetch are ``MoEModel``'s own (``_moe``, ``_dense_mlp``,
``_prefetch_after``): only their input is made here. Anything else (several tokens, a compressed
or bounded cache, OLMoE's whole-projection q/k norm, an o-projection bias, no C kernels) keeps
``MoEModel._forward``'s general path. Logits equal that path's up to float rounding (the sums run
in another order): tests/moe/test_moe_step.py measures it.
"""

from __future__ import annotations

import ctypes
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from local_engine import norm_kernel, qkernel
from local_engine.errors import ContextOverflow
from local_engine.models.layers import KVCache, linear
from local_engine.quant import GGUFBlockLinear

if TYPE_CHECKING:
    from local_engine.models.moe import MoEModel


@dataclass(frozen=True)
class _Layer:
    """The names of layer ``i``'s weights in ``model.lin`` / ``model.w``: looked up at every step, so
    the step multiplies what the model holds now (a test swaps matrices after open)."""

    blocks: bool  # GGUF blocks (``pack --dense int8|int4``): q|k|v fused, the input norm folded in
    qkv: str  # the fused blocks' name in ``lin``
    o: str  # in ``lin`` (blocks) or ``w`` (fp32)
    qkv_fp32: tuple[tuple[str, str], ...]  # fp32 q, k, v: (weight, bias) names; a bias may be absent
    input_norm: str
    post_norm: str
    qk_norms: tuple[str, str] | None  # Qwen3's per-head q and k norm weights [head_dim]
    moe: bool
    mlp_prefix: str  # a dense MLP layer's weights (``moe`` False)


def _layer(model: MoEModel, i: int) -> _Layer | None:
    """Layer ``i`` as the step takes it, or None (then no layer takes the step)."""
    w, lin, p = model.w, model.lin, f"model.layers.{i}."
    a = p + "self_attn."
    qk = (a + "q_norm.weight", a + "k_norm.weight") if model.spec.qk_norm == "head" else None
    qkv, o = lin.get(a + "qkv"), lin.get(a + "o_proj.weight")
    blocks = isinstance(qkv, GGUFBlockLinear) and isinstance(o, GGUFBlockLinear) and o.bias is None
    fp32 = qkv is None and o is None and all(a + f"{x}_proj.weight" in w for x in "qkvo")
    if not (blocks or fp32) or a + "o_proj.bias" in w:
        return None  # matrices of two kinds, or an o bias: not worth a path of their own
    return _Layer(blocks, a + "qkv", a + "o_proj.weight",
                  tuple((a + f"{x}_proj.weight", a + f"{x}_proj.bias") for x in "qkv"),
                  p + "input_layernorm.weight", p + "post_attention_layernorm.weight", qk,
                  i in model.moe_layers, p + "mlp.")


class DecodeStep:
    """``(ids [1], cache, prefetch, decode) -> logits [1, vocab]`` for ``MoEModel._forward``;
    ``build`` returns None for a model it does not apply to."""

    def __init__(self, model: MoEModel, qlib: ctypes.CDLL, nlib: ctypes.CDLL, layers: list[_Layer]) -> None:
        self.m = model
        self.layers = layers
        # 8-lane dot products where the head dim allows (qkernel.attn_step_v), else the scalar kernel
        self._attend = qlib.attn_step_v if model.hd % 8 == 0 else qlib.attn_step
        self._head_norms, self._rms_row = nlib.head_norms, nlib.rms_row
        self._scale = 1.0 / math.sqrt(model.hd)
        self._scores = torch.empty(0)  # the attention kernel's per-position scratch, grown to a cache's length

    @classmethod
    def build(cls, model: MoEModel) -> DecodeStep | None:
        qlib, nlib = qkernel.load(), norm_kernel.KERNEL.get()[0]
        if qlib is None or nlib is None or model.spec.qk_norm not in ("", "head") or model.nh % model.nkv:
            return None
        layers = []
        for i in range(model.n_layers):
            layer = _layer(model, i)
            if layer is None:
                return None
            layers.append(layer)
        return cls(model, qlib, nlib, layers)

    def _scratch(self, n: int) -> int:
        if self._scores.numel() < n:
            self._scores = torch.empty(n)
        return self._scores.data_ptr()

    def __call__(self, ids: torch.Tensor, cache: KVCache, prefetch: bool, decode: bool) -> torch.Tensor:
        m = self.m
        p, ms = cache.length, cache.max_seq
        if p >= ms:
            raise ContextOverflow(f"context length exceeded: {p + 1} > {ms} tokens")
        if cache.kv.dtype != torch.float32 or not cache.kv.is_contiguous():
            raise ValueError("the MoE decode step needs a contiguous fp32 KV cache")
        hq, hk, hd, H, eps = m.nh, m.nkv, m.hd, m.H, m.eps
        rope = m._rope(p + 1)
        cos = rope.cos.data_ptr() + p * hd * 4  # row p of the [max_pos, hd] fp32 tables
        sin = rope.sin.data_ptr() + p * hd * 4
        kv0, kv_layer = cache.kv.data_ptr(), cache.kv.stride(0) * 4
        scores = self._scratch(ms)
        attend, head_norms, rms_row, scale = self._attend, self._head_norms, self._rms_row, self._scale
        w, lin = m.w, m.lin
        x = w["model.embed_tokens.weight"][ids]  # [1, H], a fresh tensor: the residual stream, added into in place
        o = torch.empty(1, hq * hd)  # attention's output, then the o projection's input: every layer's
        h = torch.empty(1, H)  # a norm's output: every layer's (its users finish in the layer)
        xp, op, hp = x.data_ptr(), o.data_ptr(), h.data_ptr()
        # fp32 matrices: q, k and v written side by side into one row (the layout attn_step reads)
        rows = torch.empty((hq + 2 * hk) * hd)
        cuts = (0, hq * hd, (hq + hk) * hd, (hq + 2 * hk) * hd)
        parts = [rows[a:b] for a, b in itertools.pairwise(cuts)]
        x0, o0, h0 = x[0], o[0], h[0]
        for i, L in enumerate(self.layers):
            if L.blocks:
                qkv = lin[L.qkv]
                assert isinstance(qkv, GGUFBlockLinear)
                r = qkv.fused(x, w[L.input_norm].contiguous(), eps)
                if qkv.bias is not None:
                    r.add_(qkv.bias)
            else:
                r = rows
                rms_row(xp, w[L.input_norm].contiguous().data_ptr(), eps, H, hp)
                for part, (wn, bn) in zip(parts, L.qkv_fp32, strict=True):
                    b = w.get(bn)
                    if b is None:
                        torch.mv(w[wn], h0, out=part)
                    else:
                        torch.addmv(b, w[wn], h0, out=part)
            rp = r.data_ptr()
            if L.qk_norms is not None:
                qn, kn = (w[n].contiguous() for n in L.qk_norms)
                head_norms(rp, hq, hk, hd, qn.data_ptr(), kn.data_ptr(), eps)
            attend(rp, cos, sin, kv0 + i * kv_layer, p, ms, hq, hk, hd, scale, op, scores)
            if L.blocks:
                wo = lin[L.o]
                assert isinstance(wo, GGUFBlockLinear)
                wo.fused(o, out=x)
            else:
                x0.addmv_(w[L.o], o0)
            rms_row(xp, w[L.post_norm].contiguous().data_ptr(), eps, H, hp)
            x.add_(m._moe(i, h, decode) if L.moe else m._dense_mlp(L.mlp_prefix, h))
            if prefetch:
                m._prefetch_after(i, x)
        cache.advance(1)
        m.run.tokens_processed += 1
        norm, head = w["model.norm.weight"].contiguous(), lin.get("lm_head.weight")
        if isinstance(head, GGUFBlockLinear) and head.bias is None:
            return head.fused(x, norm, eps)
        rms_row(xp, norm.data_ptr(), eps, H, hp)
        return linear(h, m._linear("lm_head.weight"))
