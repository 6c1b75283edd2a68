"""Llama-family forward pass (Llama, Mistral, Qwen2, Qwen3, SmolLM): the compute only.

One sequence at a time; x is [T, d]. The weights come from ``formats.llama_weights`` (the config,
tensor names, GGUF un-permutation and the representation ``weights`` chooses for each matrix),
read from a TensorStore once at load.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F

from local_engine import kv_cache
from local_engine.errors import UnsupportedModel
from local_engine.formats.llama_weights import WEIGHT_MODES, LlamaConfig, LlamaWeights, embedding_rows
from local_engine.models.base import CausalLM
from local_engine.models.layers import KVCache, RopeTables, attention, rms_norm, rope_inv_freq, swiglu
from local_engine.quant import GGUFBlockLinear
from local_engine.store import TensorStore

# A long prompt runs in chunks: the attention scores, the [T, ffn] activations and the qkernel's
# quantised copies of them stay chunk-sized (peak RSS grows with the KV cache only), and they stay
# in cache. Measured on the built-in model, 1,536 tokens at 1 thread on the loaded box: one pass
# 51 tok/s and 748 MB peak RSS, chunks of 256 70 tok/s and 547 MB, 128 76 tok/s.
PREFILL_CHUNK = 256
# A speculative verify (local_engine/speculative.py) runs a few tokens after a cached prefix with
# ``verify_forward``: the general path repeats every cached K/V head for grouped-query attention
# and runs the unfused matmuls, which made a 2-token verify after 300 cached tokens cost 2.1 single
# steps on the built-in model (1.5 with ``_few``; 9 tokens 5.1 -> 4.1).
FEW_TOKENS = 16
# The batched decode step's matmuls take the B rows as they are (no padding) from 2 rows on.
# Measured per step on the built-in model's matrices (thread CPU time, benchmarks/qkernel_rows.py
# run 2026-12-05): M rows cost 0.68 / 0.65 / 0.50 / 0.41 of M single rows at M = 2 / 3 / 4 / 8;
# 5-7 rows cost what 8 do (one 8-row tile per weight row) and 3 what 4 do.
BATCH_MIN_ROWS = 2


class LlamaModel(CausalLM):
    prefill_chunk = PREFILL_CHUNK  # what forward() splits a prompt by (sequence.ChunksPrefill)

    def __init__(self, store: TensorStore, cfg: LlamaConfig, weights: str = "auto",
                 max_seq: int = 4096, kv: kv_cache.KVConfig | None = None) -> None:
        if weights not in WEIGHT_MODES:
            raise UnsupportedModel(store.info.path, f"weights mode {weights!r} (one of {WEIGHT_MODES})")
        self.kv_config = kv or kv_cache.KVConfig()
        try:
            kv_cache.check(self.kv_config, cfg.head_dim, cfg.context_length)
        except ValueError as e:
            raise UnsupportedModel(store.info.path, str(e)) from None
        self.store, self.cfg, self.mode = store, cfg, weights
        self.max_seq = min(max_seq, cfg.context_length)
        w = LlamaWeights(store, cfg, weights)
        self._qlib, self.kernel = w.qlib, w.kernel
        self.weight_bytes, self.kinds = w.weight_bytes, w.kinds
        self.layers, self.norm, self.head = w.layers, w.norm, w.head
        self._emb, self._emb_raw = w.emb, w.emb_raw
        inv, att = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.context_length, w.rope_freqs)
        self.rope = RopeTables(inv, self.max_seq, att)
        self._ffn = cfg.ffn
        self._prepare_step()

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {"arch": c.arch, "layers": c.n_layers, "d_model": c.d_model, "heads": c.n_heads,
                "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "ffn": c.ffn, "vocab": c.vocab,
                "context_length": c.context_length, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
                "tied_embeddings": c.tied, "weights": self.mode, "matrices": dict(self.kinds), "kernel": self.kernel,
                "weight_mb": round(self.weight_bytes / 1e6, 1)}

    # --------------------------------------------------------------------------- forward
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._emb is not None:
            return self._emb[ids]
        raw = self._emb_raw
        assert raw is not None
        return embedding_rows(raw, ids)

    def new_cache(self) -> KVCache | kv_cache.CompressedKVCache:
        c = self.cfg
        if not self.kv_config.plain:
            return kv_cache.new_cache(self.kv_config, c.n_layers, c.n_kv_heads, c.head_dim, self.max_seq, self.rope)
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, self.max_seq)

    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim): what a KV cache row costs (kv_cache.bytes_per_token)."""
        return self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim

    def memory_bytes(self) -> dict[str, int]:
        return {"weights_bytes": int(self.weight_bytes), "expert_cache_bytes": 0}

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Run ``ids`` [T] after the ``cache.length`` tokens already cached; returns fp32 logits."""
        if ids.shape[0] == 1 and self._step_ok:
            return self._step(ids, cache)
        if ids.shape[0] > PREFILL_CHUNK:
            # a last piece of one token would take the one-row matmul kernel (other sums than the
            # several-row one's): it runs with the piece before
            cuts = [*range(0, ids.shape[0] - 1, PREFILL_CHUNK), ids.shape[0]]
            outs = [self._forward(ids[a:b], cache, last_only) for a, b in itertools.pairwise(cuts)]
            return outs[-1] if last_only else torch.cat(outs)
        return self._forward(ids, cache, last_only)

    def _forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        c = self.cfg
        start = cache.length
        x = self.embed(ids)
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L.attn_norm, c.eps)
            x = x + attention(h, layer=i, start=start, wq=None, wk=None, wv=None, wo=L.o,
                              n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                              rope=self.rope, cache=cache, q_norm=L.q_norm, k_norm=L.k_norm,
                              eps=c.eps, wqkv=L.qkv)
            h = rms_norm(x, L.ffn_norm, c.eps)
            x = x + swiglu(h, None, None, L.down, w_gate_up=L.gate_up)
        cache.advance(ids.shape[0])
        if last_only:  # two rows: one would take the one-row kernel, whose sums are not the others'
            return self.head(rms_norm(x[-2:], self.norm, c.eps)).float()[-1:]
        return self.head(rms_norm(x, self.norm, c.eps)).float()

    # --------------------------------------------------------------------------- decode step
    # A decode step of a 135M model is ~30 layers x a few dozen tiny ops: at ~1-4 us of Python +
    # dispatcher per op, the op count matters as much as the weight bytes. The single-token path
    # below does the same arithmetic as forward() with ~25 ops per layer instead of ~60:
    #   - q|k|v rows come out of one fused matmul and are rotated with one (mul, roll, addcmul)
    #     over all heads; the V heads get cos = 1, sin = 0 (exact), and the q heads carry the
    #     1/sqrt(head_dim) softmax scale in their cos/sin (exact for head_dim 64; one rounding
    #     otherwise), so nothing else touches q;
    #   - the rotated K heads and the V heads are adjacent, and so are they in the cache
    #     (KVCache.kv), so one copy writes both;
    #   - per-cache views (K transposed, V) are built once, not per step.
    def _prepare_step(self) -> None:
        c = self.cfg
        self._step_ok = (all(L.q_norm is None and L.k_norm is None for L in self.layers)
                         and c.n_heads % c.n_kv_heads == 0)
        self._fused = self._step_ok and all(
            isinstance(L.qkv, GGUFBlockLinear) and all(isinstance(w, GGUFBlockLinear) and w.bias is None
                                                       for w in (L.o, L.gate_up, L.down))
            for L in self.layers)
        for L in self.layers:
            L.attn_norm, L.ffn_norm = L.attn_norm.contiguous(), L.ffn_norm.contiguous()
        self.norm = self.norm.contiguous()
        hq, hk = c.n_heads, c.n_kv_heads
        scale = self._scale = 1.0 / math.sqrt(c.head_dim)
        self._rope_a = torch.cat([torch.full((hq,), scale), torch.ones(hk), torch.zeros(hk)])[:, None]
        self._rope_b = torch.cat([torch.zeros(hq + hk), torch.ones(hk)])[:, None]

    def _cache_views(self, cache: KVCache) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        views = getattr(cache, "_step_views", None)
        if views is None:
            hk = self.cfg.n_kv_heads
            views = [(cache.kv[i], cache.kv[i, :hk].transpose(1, 2), cache.kv[i, hk:])
                     for i in range(self.cfg.n_layers)]
            cache._step_views = views  # type: ignore[attr-defined]
        return views

    def _cache_ptrs(self, cache: KVCache) -> tuple[list[int], int]:
        """Addresses of each layer's K|V block and of a scores buffer, for qkernel.attn_step."""
        got = getattr(cache, "_step_ptrs", None)
        if got is None:
            if cache.kv.dtype != torch.float32 or not cache.kv.is_contiguous():
                raise ValueError("the fused decode step needs a contiguous fp32 KV cache")
            scores = torch.empty(cache.max_seq)
            got = ([cache.kv[i].data_ptr() for i in range(self.cfg.n_layers)], scores.data_ptr(), scores)
            cache._step_ptrs = got  # type: ignore[attr-defined]
        return got[0], got[1]

    @torch.inference_mode()
    def verify_forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """``forward`` for a speculative verify: logits of every position, from the decode step's
        arithmetic (the fused kernels), so they sit closer to plain decoding's than prefill's do.
        Not used for prompts: the prefix cache relies on their prefill-path logits."""
        if 1 < ids.shape[0] <= FEW_TOKENS and cache.length > 0 and self._step_ok and isinstance(cache, KVCache):
            return self._few(ids, cache, last_only=False)
        return self.forward(ids, cache)

    def _few(self, ids: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        """``_step``'s arithmetic for T > 1 new tokens: q heads grouped under their K/V head (no
        repeated K/V), a causal mask over the new rows, K|V written with one copy per layer."""
        c = self.cfg
        p, T = cache.length, ids.shape[0]
        n = p + T
        if n > cache.max_seq:
            raise ValueError(f"context length exceeded: {n} > {cache.max_seq} tokens")
        d, hq, hk, hd, ffn, eps = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, self._ffn, c.eps
        heads, half, g = hq + 2 * hk, hd // 2, hq // hk
        rms = F.rms_norm
        x = self.embed(ids)
        cos = torch.addcmul(self._rope_b, self._rope_a, self.rope.cos[p:n][:, None, :])  # [T, heads, hd]
        sin = self._rope_a * self.rope._sin_signed[p:n][:, None, :]
        # row j * T + t of a K/V head's group is q head j at new token t: it sees positions <= p + t
        masked = ~torch.ones(T, n, dtype=torch.bool).tril(diagonal=p).repeat(g, 1)
        fused = self._fused  # GGUF blocks behind qkernel: norm folded in, residuals added in place
        for L, (kv, kt, v) in zip(self.layers, self._cache_views(cache), strict=True):
            if fused:
                r = L.qkv.fused(x, L.attn_norm, eps)
                if L.qkv.bias is not None:
                    r = r + L.qkv.bias
            else:
                r = L.qkv(rms(x, (d,), L.attn_norm, eps))
            r = r.view(T, heads, hd)
            r = torch.addcmul(r * cos, r.roll(half, -1), sin)
            kv[:, p:n] = r[:, hq:].transpose(0, 1)
            q = r[:, :hq].transpose(0, 1).reshape(hk, g * T, hd)
            att = torch.bmm(q, kt[:, :, :n]).masked_fill_(masked, float("-inf")).softmax(-1)
            o = torch.bmm(att, v[:, :n]).view(hq, T, hd).transpose(0, 1).reshape(T, hq * hd)
            if fused:
                L.o.fused(o, out=x)
                gu = L.gate_up.fused(x, L.ffn_norm, eps)
                L.down.fused(F.silu(gu[:, :ffn]) * gu[:, ffn:], out=x)
            else:
                x = x + L.o(o)
                gu = L.gate_up(rms(x, (d,), L.ffn_norm, eps))
                x = x + L.down(F.silu(gu[:, :ffn]) * gu[:, ffn:])
        cache.advance(T)
        if last_only:
            x = x[-1:].contiguous()
        if isinstance(self.head, GGUFBlockLinear):
            return self.head.fused(x, self.norm, eps)
        return self.head(rms(x, (d,), self.norm, eps)).float()

    @torch.inference_mode()
    def step_batch(self, ids: torch.Tensor, caches: list[Any]) -> torch.Tensor:
        """One decode token for each of B sequences (local_engine/scheduler.py): ``ids`` [B], token
        b runs after the ``caches[b].length`` tokens of its own cache; fp32 logits [B, vocab].

        The matmuls take the B rows together, so each weight block is read once per step for the
        whole batch (the decode step's cost is its weight bytes); attention stays per sequence
        (each has its own length). Fewer than ``BATCH_MIN_ROWS`` rows, or no fused GGUF kernels:
        each sequence runs ``forward``'s own decode step (correct, not faster)."""
        B = ids.shape[0]
        if B < BATCH_MIN_ROWS or not self._fused:
            return torch.cat([self.forward(ids[b:b + 1], caches[b], last_only=True) for b in range(B)])
        c = self.cfg
        for cache in caches:
            if cache.length >= cache.max_seq:
                raise ValueError(f"context length exceeded: {cache.length + 1} > {cache.max_seq} tokens")
        ffn, eps = self._ffn, c.eps
        x = self.embed(ids)
        o = torch.empty(B, c.n_heads * c.head_dim)  # each row written by its sequence's attention
        rows_attend = self._rows_attention(caches, o)
        attends = [] if rows_attend else [self._step_attention(cache, o[b]) for b, cache in enumerate(caches)]
        for i, L in enumerate(self.layers):
            r = L.qkv.fused(x, L.attn_norm, eps)
            if L.qkv.bias is not None:
                r = r + L.qkv.bias
            if rows_attend:
                rows_attend(i, r)
            for b, attend in enumerate(attends):
                attend(i, r[b])
            L.o.fused(o, out=x)
            gu = L.gate_up.fused(x, L.ffn_norm, eps)
            L.down.fused(F.silu(gu[:, :ffn]) * gu[:, ffn:], out=x)
        for cache in caches:
            cache.advance(1)
        if isinstance(self.head, GGUFBlockLinear):
            return self.head.fused(x, self.norm, eps)
        return self.head(F.rms_norm(x, (c.d_model,), self.norm, eps)).float()

    def _rows_attention(self, caches: list[Any], o: torch.Tensor) -> _RowsAttention | None:
        """Every sequence's attention of a batched step in one C call per layer, or None where that
        does not apply (a compressed cache, caches of unlike storage, a head dim not a multiple of 8)."""
        ms = caches[0].max_seq if isinstance(caches[0], KVCache) else 0
        if self.cfg.head_dim % 8 or not all(isinstance(k, KVCache) and k.max_seq == ms for k in caches):
            return None
        return _RowsAttention(self, caches, o)

    def _step_attention(self, cache: Any, o: torch.Tensor) -> Any:
        """``(layer, qkv rows) -> None``: RoPE, K/V write and attention of one token into ``o``."""
        if not isinstance(cache, KVCache):
            return lambda i, r: cache.step(i, r.view(-1, self.cfg.head_dim), o.view(-1))
        c, p, lib = self.cfg, cache.length, self._qlib
        assert lib is not None  # only the fused path attends here, and it runs on the loaded kernel
        ptrs, scores = self._cache_ptrs(cache)
        cp, sp, op = self.rope.cos[p].data_ptr(), self.rope.sin[p].data_ptr(), o.data_ptr()
        hq, hk, hd, ms, sc = c.n_heads, c.n_kv_heads, c.head_dim, cache.max_seq, self._scale
        # 8-lane dot products where the head dim allows (qkernel.attn_step_v), else the scalar kernel
        step = lib.attn_step_v if hd % 8 == 0 else lib.attn_step
        return lambda i, r: step(r.data_ptr(), cp, sp, ptrs[i], p, ms, hq, hk, hd, sc, op, scores)

    def _step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        c = self.cfg
        p = cache.length
        if not isinstance(cache, KVCache) and not self._fused:
            return self._forward(ids, cache, False)  # the compressed cache attends (kv_cache.py)
        if p >= cache.max_seq:
            raise ValueError(f"context length exceeded: {p + 1} > {cache.max_seq} tokens")
        n = p + 1
        d, hq, hk, hd, ffn, eps = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, self._ffn, c.eps
        heads, half = hq + 2 * hk, hd // 2
        rms = F.rms_norm
        x = self.embed(ids)
        if self._fused:
            # GGUF blocks behind qkernel: RMSNorm is folded into the kernel's activation pass, the
            # residual adds are the kernel writing into x, and RoPE + KV write + attention over the
            # cache is one C call (qkernel.attn_step): ~6 calls per layer instead of ~25 ops
            o = torch.empty(1, hq * hd)
            attend = self._step_attention(cache, o)
            for i, L in enumerate(self.layers):
                r = L.qkv.fused(x, L.attn_norm, eps)
                if L.qkv.bias is not None:
                    r = r + L.qkv.bias
                attend(i, r)
                L.o.fused(o, out=x)
                gu = L.gate_up.fused(x, L.ffn_norm, eps)
                L.down.fused(F.silu(gu[:, :ffn]) * gu[:, ffn:], out=x)
            cache.advance(1)
            if isinstance(self.head, GGUFBlockLinear):
                return self.head.fused(x, self.norm, eps)
            return self.head(rms(x, (d,), self.norm, eps)).float()
        cos = torch.addcmul(self._rope_b, self._rope_a, self.rope.cos[p])
        sin = self._rope_a * self.rope._sin_signed[p]
        for L, (kv, kt, v) in zip(self.layers, self._cache_views(cache), strict=True):
            r = L.qkv(rms(x, (d,), L.attn_norm, eps)).view(heads, hd)
            r = torch.addcmul(r * cos, r.roll(half, -1), sin)
            kv[:, p] = r[hq:]
            att = torch.bmm(r[:hq].view(hk, -1, hd), kt[:, :, :n]).softmax(-1)
            x.add_(L.o(torch.bmm(att, v[:, :n]).view(1, hq * hd)))
            gu = L.gate_up(rms(x, (d,), L.ffn_norm, eps))
            x.add_(L.down(F.silu(gu[:, :ffn]) * gu[:, ffn:]))
        cache.advance(1)
        return self.head(rms(x, (d,), self.norm, eps)).float()


class _RowsAttention:
    """``(layer, qkv rows [B, ...]) -> None`` for ``step_batch``: RoPE, K/V write and attention of
    each sequence's token into its row of ``o`` (qkernel.attn_rows: one ctypes call per layer, where
    a call per sequence and layer cost more than the attention itself at short contexts)."""

    def __init__(self, model: LlamaModel, caches: list[KVCache], o: torch.Tensor) -> None:
        c = model.cfg
        assert model._qlib is not None  # the fused step runs on qkernel
        self.lib = model._qlib
        # the addresses the kernel reads, in tensors that live as long as this object
        self.kv = torch.tensor([model._cache_ptrs(k)[0] for k in caches], dtype=torch.int64).T.contiguous()
        pos = [k.length for k in caches]
        self.pos = torch.tensor(pos, dtype=torch.int32)
        self.cos = torch.tensor([model.rope.cos[p].data_ptr() for p in pos], dtype=torch.int64)
        self.sin = torch.tensor([model.rope.sin[p].data_ptr() for p in pos], dtype=torch.int64)
        ms = caches[0].max_seq
        self.scores = torch.empty(ms)
        self.row_kv = [self.kv[i].data_ptr() for i in range(c.n_layers)]
        self.args = (len(caches), self.cos.data_ptr(), self.sin.data_ptr())
        self.tail = (self.pos.data_ptr(), ms, c.n_heads, c.n_kv_heads, c.head_dim, model._scale, o.data_ptr(),
                     o.shape[1], self.scores.data_ptr())

    def __call__(self, i: int, r: torch.Tensor) -> None:
        B, cos, sin = self.args
        self.lib.attn_rows(B, r.data_ptr(), r.shape[1], cos, sin, self.row_kv[i], *self.tail)
