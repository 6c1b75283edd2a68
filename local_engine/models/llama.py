"""Llama-family forward pass (Llama, Mistral, Qwen2, Qwen3, SmolLM) from a TensorStore.

One sequence at a time; x is [T, d]. Weights are read from the store once at load and kept in the
representation chosen by ``weights``:

    "auto"  GGUF Q4_0/Q4_1/Q8_0 matrices (and the vocab head) stay as the file's blocks behind
            local_engine.qkernel (AVX2, int16 activations per block of 32); other GGUF quant
            types -> fp16 (fbgemm packed fp16 GEMM); if qkernel cannot be built here, GGUF
            matrices -> fp16 and the vocab head int8 per row; float tensors keep their stored
            dtype (fp32/bf16)
    "int4"  GGUF Q4_0/Q4_1 -> PyTorch int4 groups (exact, no re-quantisation; smallest memory),
            other GGUF quant types -> int8 per row
    "f32"   everything dequantised to fp32 (the reference path the tests compare with HF)
    "bf16"  everything in bf16
    "int8"  every matrix int8 per row (bf16 activations), float models included

Fused weights: q|k|v and gate|up are concatenated so a layer does 4 matmuls per token.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from local_engine import kv_cache, qkernel
from local_engine.errors import UnsupportedModel
from local_engine.formats.gguf import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, dequantize_blocks, unpermute_rows
from local_engine.models.base import CausalLM
from local_engine.models.layers import KVCache, RopeTables, attention, rms_norm, rope_inv_freq, swiglu
from local_engine.quant import DenseLinear, F16Linear, GGUFBlockLinear, Int4Linear, Int8Linear, SizedLinear
from local_engine.store import GGUFStore, RawTensor, TensorStore

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
# GGUF architectures we run, and their quirk: whether llama.cpp's converter permuted the q/k rows
# (its RoPE pairs adjacent dims; llama-arch models only), undone at load
GGUF_ARCHS = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}
HF_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
WEIGHT_MODES = ("auto", "int4", "f32", "bf16", "int8")
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # what local_engine.qkernel multiplies in place


@dataclass
class LlamaConfig:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    rope_theta: float
    context_length: int
    rope_scaling: dict[str, Any] | None = None
    tied: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# the tensors a layer / the model reads, by their GGUF names (HF names: formats.gguf's table)
_LAYER_KEYS = {
    "attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight",
    "o": "attn_output.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight", "ffn_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
}
_GLOBAL_KEYS = {"embed": "token_embd.weight", "norm": "output_norm.weight", "head": "output.weight",
                "rope_freqs": "rope_freqs.weight"}  # rope_freqs: GGUF only (llama3 scaling baked in)


def config_from_gguf(store: GGUFStore) -> LlamaConfig:
    m = store.info.metadata
    arch = str(m.get("general.architecture", "?"))
    if arch not in GGUF_ARCHS:
        raise UnsupportedModel(store.path, f"architecture {arch!r} (supported: {sorted(GGUF_ARCHS)})")

    def g(key: str, default: Any = None) -> Any:
        v = m.get(f"{arch}.{key}", default)
        if v is None:
            raise UnsupportedModel(store.path, f"missing metadata {arch}.{key}")
        return v

    d = int(g("embedding_length"))
    n_heads = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_heads))
    head_dim = int(m.get(f"{arch}.attention.key_length") or d // n_heads)
    scaling = None
    stype = m.get(f"{arch}.rope.scaling.type")
    if stype and stype != "none":
        scaling = {"rope_type": stype, "factor": float(m.get(f"{arch}.rope.scaling.factor", 1.0))}
        orig = m.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
    names = set(store.names())
    vocab = int(m.get(f"{arch}.vocab_size") or store.shape("token_embd.weight")[0])
    return LlamaConfig(
        arch=arch, n_layers=int(g("block_count")), d_model=d, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, ffn=int(g("feed_forward_length")), vocab=vocab,
        eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)), rope_theta=float(g("rope.freq_base", 10000.0)),
        context_length=int(g("context_length", 4096)), rope_scaling=scaling,
        tied="output.weight" not in names,
    )


def config_from_hf(store: TensorStore) -> LlamaConfig:
    c = store.info.metadata
    mt = c.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise UnsupportedModel(store.info.path, f"model_type {mt!r} (supported: {sorted(HF_MODEL_TYPES)})")
    d = int(c["hidden_size"])
    n_heads = int(c["num_attention_heads"])
    theta = c.get("rope_theta")
    scaling = c.get("rope_scaling")
    rp = c.get("rope_parameters")  # transformers 5 nests theta and scaling here
    if isinstance(rp, dict):
        theta = rp.get("rope_theta", theta)
        if rp.get("rope_type", "default") != "default":
            scaling = rp
    return LlamaConfig(
        arch=mt, n_layers=int(c["num_hidden_layers"]), d_model=d, n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        head_dim=int(c.get("head_dim") or d // n_heads), ffn=int(c["intermediate_size"]),
        vocab=int(c["vocab_size"]), eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta or 10000.0), context_length=int(c.get("max_position_embeddings", 4096)),
        rope_scaling=scaling, tied="lm_head.weight" not in set(store.names()),
    )


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: Any
    o: Any
    gate_up: Any
    down: Any
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


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
        self.gguf = store.info.format == "gguf"
        self._permute = self.gguf and GGUF_ARCHS.get(cfg.arch, False)
        self.max_seq = min(max_seq, cfg.context_length)
        self._names = set(store.names())
        # "auto" on a GGUF: Q4_0/Q4_1/Q8_0 matrices stay as GGUF blocks behind the AVX2 kernel
        # (local_engine.qkernel); None when it cannot be built here -> PyTorch kernels below
        self._qlib = qkernel.load() if (weights == "auto" and self.gguf) else None
        self.kernel = "qkernel-avx2" if self._qlib is not None else "torch"
        if weights == "auto" and self.gguf and self._qlib is None:
            self.kernel = f"torch (qkernel unavailable: {qkernel.unavailable_reason})"
        self.weight_bytes = 0
        self.kinds: dict[str, int] = {}
        self.layers = [self._load_layer(i) for i in range(cfg.n_layers)]
        self.norm = self._vec(self._name("norm"))
        self._load_embeddings()
        freq = None
        if self.gguf and self._name("rope_freqs") in self._names:
            freq = store.get(self._name("rope_freqs"))
        inv, att = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.context_length, freq)
        self.rope = RopeTables(inv, self.max_seq, att)
        self._ffn = cfg.ffn
        self._prepare_step()

    # --------------------------------------------------------------------------- loading
    def _name(self, key: str, layer: int | None = None) -> str:
        if layer is None:
            g = _GLOBAL_KEYS[key]
            return g if self.gguf else GGUF_GLOBAL_NAMES.get(g, "")
        gg = _LAYER_KEYS[key]
        hf = GGUF_LAYER_NAMES[gg]
        return f"blk.{layer}.{gg}" if self.gguf else f"model.layers.{layer}.{hf}"

    def _vec(self, name: str) -> torch.Tensor:
        return self.store.get(name).float()

    def _opt(self, name: str) -> torch.Tensor | None:
        return self._vec(name) if name in self._names else None

    def _rows(self, name: str, n_head: int | None) -> tuple[torch.Tensor | None, RawTensor | None]:
        """A matrix as (float tensor, None) or (None, raw quantised), q/k rows un-permuted for GGUF."""
        raw = self.store.raw(name) if self.gguf else None
        perm = unpermute_rows(self.store.shape(name)[0], n_head) if (self._permute and n_head) else None  # type: ignore[attr-defined]
        if raw is not None and self.mode == "int4" and raw.qtype in ("Q4_0", "Q4_1"):
            if perm is not None:
                raw = RawTensor(raw.name, raw.qtype, raw.shape, raw.data[perm])
            return None, raw
        w = self.store.get(name)
        if perm is not None:
            w = w[torch.from_numpy(perm)]
        return w, None

    def _block_linear(self, names: list[tuple[str, int | None]], bias: torch.Tensor | None) -> GGUFBlockLinear | None:
        """The GGUF blocks themselves behind the AVX2 kernel, when every part is Q4_0/Q4_1/Q8_0 of one type."""
        raws = [self.store.raw(n) for n, _ in names]
        if any(r is None or r.qtype not in BLOCK_TYPES for r in raws) or len({r.qtype for r in raws}) != 1:  # type: ignore[union-attr]
            return None
        parts = []
        for r, (_, h) in zip(raws, names, strict=True):
            assert r is not None
            if self._permute and h:
                r = RawTensor(r.name, r.qtype, r.shape, r.data[unpermute_rows(r.shape[0], h)])
            parts.append(r)
        return GGUFBlockLinear.from_raw(self._qlib, parts, bias)

    def _linear(self, names: list[tuple[str, int | None]], bias: torch.Tensor | None = None,
                head: bool = False) -> SizedLinear:
        lin: SizedLinear
        if self._qlib is not None:
            blk = self._block_linear(names, bias)
            if blk is not None:
                self.weight_bytes += blk.nbytes
                kind = "gguf-" + blk.qtype.lower()
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                return blk
        if head and self.gguf and self.mode in ("auto", "int4", "int8"):
            raw = self.store.raw(names[0][0])
            if raw is not None:  # dequantise + re-quantise the vocab head chunk by chunk (peak RSS)
                lin = Int8Linear(self._dequant_chunks(raw))
                self.weight_bytes += lin.nbytes
                self.kinds["int8"] = self.kinds.get("int8", 0) + 1
                return lin
        parts = [self._rows(n, h) for n, h in names]
        raws = [r for _, r in parts if r is not None]
        if len(raws) == len(parts):
            lin = Int4Linear.from_raw(raws, bias)
            kind = "int4"
        else:
            ws = [w if w is not None else self.store.get(r.name) for w, r in parts]  # type: ignore[union-attr]
            w = torch.cat(ws) if len(ws) > 1 else ws[0]
            quantised = self.gguf and any(r is not None or self.store.qtype(n) not in ("F32", "F16", "BF16")  # type: ignore[attr-defined]
                                          for (_, r), (n, _) in zip(parts, names, strict=True))
            if self.mode == "int8" or (self.mode == "auto" and quantised):
                # the vocab head is the largest matrix; int8 halves its bytes per token for ~no accuracy cost
                use_f16 = self.mode == "auto" and not head
                lin, kind = (F16Linear(w, bias), "f16") if use_f16 else (Int8Linear(w, bias), "int8")
            elif self.mode == "int4" and quantised:
                lin, kind = Int8Linear(w, bias), "int8"
            elif self.mode == "bf16" or (self.mode == "auto" and w.dtype == torch.bfloat16):
                lin, kind = DenseLinear(w, bias, torch.bfloat16), "bf16"
            else:
                lin, kind = DenseLinear(w.float(), bias), "f32"
        self.weight_bytes += lin.nbytes
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        return lin

    def _load_layer(self, i: int) -> _Layer:
        c = self.cfg
        n = self._name
        biases = [self._opt(n(k, i)) for k in ("q_bias", "k_bias", "v_bias")]
        bias = None
        if any(b is not None for b in biases):
            sizes = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)
            bias = torch.cat([b if b is not None else torch.zeros(s) for b, s in zip(biases, sizes, strict=True)])
            if self._permute:
                qn, kn = sizes[0], sizes[1]
                bias[:qn] = bias[:qn][torch.from_numpy(unpermute_rows(qn, c.n_heads))]
                bias[qn:qn + kn] = bias[qn:qn + kn][torch.from_numpy(unpermute_rows(kn, c.n_kv_heads))]
        return _Layer(
            attn_norm=self._vec(n("attn_norm", i)),
            ffn_norm=self._vec(n("ffn_norm", i)),
            qkv=self._linear([(n("q", i), c.n_heads), (n("k", i), c.n_kv_heads), (n("v", i), None)], bias),
            o=self._linear([(n("o", i), None)]),
            gate_up=self._linear([(n("gate", i), None), (n("up", i), None)]),
            down=self._linear([(n("down", i), None)]),
            q_norm=self._opt(n("q_norm", i)),
            k_norm=self._opt(n("k_norm", i)),
        )

    @staticmethod
    def _dequant_chunks(raw: RawTensor, rows: int = 4096) -> Any:
        for a in range(0, raw.shape[0], rows):
            yield dequantize_blocks(raw.data[a:a + rows], raw.qtype).reshape(-1, raw.shape[1])

    def _load_embeddings(self) -> None:
        emb_name = self._name("embed")
        self._emb_raw = self.store.raw(emb_name) if self.gguf else None
        if self._emb_raw is not None and self.mode != "f32":
            # quantised table: dequantise only the rows a step needs
            self._emb = None
        else:
            self._emb = self.store.get(emb_name).float()
        head_name = emb_name if self.cfg.tied else self._name("head")
        self.head = self._linear([(head_name, None)], head=True)

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
        rows = raw.data[ids.numpy()]
        if raw.qtype == "Q8_0":
            # blocks of 32: fp16 scale + 32 int8; a handful of numpy ops instead of gguf's generic
            # dequantiser (46 us per row, called every decode step)
            b = rows.reshape(len(ids), -1, 34)
            d = b[:, :, :2].copy().view(np.float16).astype(np.float32)
            out = b[:, :, 2:].view(np.int8).astype(np.float32) * d
            return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(len(ids), -1)
        return dequantize_blocks(rows, raw.qtype).reshape(len(ids), -1)

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
