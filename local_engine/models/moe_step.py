"""The packed MoE model's one-token decode step over a plain KV cache, outside the experts.

Why: a warm int4@int8 decode token of the 24-layer benchmark model was ~28 ms, of which the experts
were 11; most of the rest was ~25 PyTorch dispatches a layer (RMSNorm, the q|k|v split, per-head
q/k norms, RoPE via roll/addcmul, the cache write, two bmm's and a softmax, the residual adds), at
1-18 us each on one row. The dense Llama model's step (models/llama.py) showed the way; this does
the same for ``MoEModel`` where its resident matrices are GGUF blocks (``pack --dense int8|int4``):

- the input RMSNorm is folded into the q|k|v matmul's activation pass (``GGUFBlockLinear.fused``);
- Qwen3's per-head q/k norms are one C call (``norm_kernel.head_norms``), RoPE + the K/V write +
  attention over the cache another (``qkernel.attn_step_v``);
- the o projection adds into the residual stream in place (``fused(out=x)``);
- the post-attention RMSNorm is one C call into a buffer reused by every layer, since the router
  (fp32) and the experts (``gq_expert``) take the normed row, not a norm to fold;
- the final norm is folded into the vocab head's matmul.

The experts, routing and prefetch are ``MoEModel``'s own (``_moe``, ``_dense_mlp``,
``_prefetch_after``): only their input is made here. Anything else (several tokens, a compressed
or bounded cache, fp32 resident matrices, OLMoE's whole-projection q/k norm, no C kernels) keeps
``MoEModel._forward``'s general path. Logits equal that path's up to float rounding (the sums run
in another order): tests/moe/test_moe_step.py measures it.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from local_engine import norm_kernel, qkernel
from local_engine.errors import ContextOverflow
from local_engine.models.layers import KVCache, linear, rms_norm
from local_engine.quant import GGUFBlockLinear

if TYPE_CHECKING:
    from local_engine.models.moe import MoEModel


@dataclass(frozen=True)
class _Layer:
    qkv: GGUFBlockLinear
    qkv_bias: torch.Tensor | None
    o: GGUFBlockLinear
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qk_norms: tuple[torch.Tensor, torch.Tensor] | None  # Qwen3's per-head q and k norm weights [head_dim]
    moe: bool
    mlp_prefix: str  # a dense MLP layer's weights (``moe`` False)


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
        self._norm = model.w["model.norm.weight"].contiguous()
        head = model.lin.get("lm_head.weight")
        self._head = head if isinstance(head, GGUFBlockLinear) and head.bias is None else None
        self._scores = torch.empty(0)  # the attention kernel's per-position scratch, grown to a cache's length

    @classmethod
    def build(cls, model: MoEModel) -> DecodeStep | None:
        qlib, nlib = qkernel.load(), norm_kernel.load()
        if qlib is None or nlib is None or model.spec.qk_norm not in ("", "head") or model.nh % model.nkv:
            return None
        w, layers = model.w, []
        for i in range(model.n_layers):
            p = f"model.layers.{i}."
            qkv, o = model.lin.get(p + "self_attn.qkv"), model.lin.get(p + "self_attn.o_proj.weight")
            if not (isinstance(qkv, GGUFBlockLinear) and isinstance(o, GGUFBlockLinear) and o.bias is None):
                return None
            qk = None
            if model.spec.qk_norm == "head":
                qk = (w[p + "self_attn.q_norm.weight"].contiguous(), w[p + "self_attn.k_norm.weight"].contiguous())
            layers.append(_Layer(qkv, qkv.bias, o, w[p + "input_layernorm.weight"].contiguous(),
                                 w[p + "post_attention_layernorm.weight"].contiguous(), qk,
                                 i in model.moe_layers, p + "mlp."))
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
        x = m.w["model.embed_tokens.weight"][ids]  # [1, H], a fresh tensor: the residual stream, added into in place
        o = torch.empty(1, hq * hd)  # attention's output, then the o projection's input: every layer's
        h = torch.empty(1, H)  # the post-attention norm's output: every layer's (its users finish in the layer)
        xp, op, hp = x.data_ptr(), o.data_ptr(), h.data_ptr()
        for i, L in enumerate(self.layers):
            r = L.qkv.fused(x, L.input_norm, eps)
            if L.qkv_bias is not None:
                r.add_(L.qkv_bias)
            rp = r.data_ptr()
            if L.qk_norms is not None:
                head_norms(rp, hq, hk, hd, L.qk_norms[0].data_ptr(), L.qk_norms[1].data_ptr(), eps)
            attend(rp, cos, sin, kv0 + i * kv_layer, p, ms, hq, hk, hd, scale, op, scores)
            L.o.fused(o, out=x)
            rms_row(xp, L.post_norm.data_ptr(), eps, H, hp)
            x.add_(m._moe(i, h, decode) if L.moe else m._dense_mlp(L.mlp_prefix, h))
            if prefetch:
                m._prefetch_after(i, x)
        cache.advance(1)
        m.run.tokens_processed += 1
        if self._head is not None:
            return self._head.fused(x, self._norm, eps)
        return linear(rms_norm(x, self._norm, eps), m._linear("lm_head.weight"))
