"""Dense Llama-family weights (Llama, Mistral, Qwen2, Qwen3, SmolLM) from a TensorStore, apart from
the forward pass (models/llama.py): the config, the tensors' names, the q/k un-permutation of
llama-arch GGUF files, the rows of a GGUF embedding table (``embedding_rows``, dequantised
per step), and the representation each matrix is kept in, chosen by ``weights``:

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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from local_engine import qkernel
from local_engine.errors import UnsupportedModel
from local_engine.formats.gguf import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, dequantize_blocks, unpermute_rows
from local_engine.quant import DenseLinear, F16Linear, GGUFBlockLinear, Int4Linear, Int8Linear, SizedLinear
from local_engine.store import GGUFStore, RawTensor, TensorStore

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
class LayerWeights:
    """One decoder layer's weights, in the representations ``weights`` chose."""

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: Any
    o: Any
    gate_up: Any
    down: Any
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


def embedding_rows(raw: RawTensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 rows ``ids`` of an embedding table kept as GGUF blocks (dequantised per step, not at load)."""
    rows = raw.data[ids.numpy()]
    if raw.qtype == "Q8_0":
        # blocks of 32: fp16 scale + 32 int8; a handful of numpy ops instead of gguf's generic
        # dequantiser (46 us per row, called every decode step)
        b = rows.reshape(len(ids), -1, 34)
        d = b[:, :, :2].copy().view(np.float16).astype(np.float32)
        out = b[:, :, 2:].view(np.int8).astype(np.float32) * d
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(len(ids), -1)
    return dequantize_blocks(rows, raw.qtype).reshape(len(ids), -1)


class LlamaWeights:
    """Every tensor the forward pass reads, loaded from ``store`` once: ``layers``, ``norm``, the
    embedding table (``emb``, or ``emb_raw``: GGUF blocks dequantised a row at a time), the vocab
    ``head``, GGUF's baked ``rope_freqs``; ``qlib`` the kernel behind GGUF blocks (None: PyTorch
    kernels), ``kernel`` its name, ``weight_bytes`` and ``kinds`` (matrices per representation)."""

    def __init__(self, store: TensorStore, cfg: LlamaConfig, mode: str) -> None:
        self.store, self.cfg, self.mode = store, cfg, mode
        self.gguf = store.info.format == "gguf"
        self._permute = self.gguf and GGUF_ARCHS.get(cfg.arch, False)
        self._names = set(store.names())
        # "auto" on a GGUF: Q4_0/Q4_1/Q8_0 matrices stay as GGUF blocks behind the AVX2 kernel
        # (local_engine.qkernel); None when it cannot be built here -> PyTorch kernels below
        self.qlib = qkernel.load() if (mode == "auto" and self.gguf) else None
        self.kernel = "qkernel-avx2" if self.qlib is not None else "torch"
        if mode == "auto" and self.gguf and self.qlib is None:
            self.kernel = f"torch (qkernel unavailable: {qkernel.unavailable_reason})"
        self.weight_bytes = 0
        self.kinds: dict[str, int] = {}
        self.layers = [self._load_layer(i) for i in range(cfg.n_layers)]
        self.norm = self._vec(self._name("norm"))
        self._load_embeddings()
        self.rope_freqs = None
        if self.gguf and self._name("rope_freqs") in self._names:
            self.rope_freqs = store.get(self._name("rope_freqs"))

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
        return GGUFBlockLinear.from_raw(self.qlib, parts, bias)

    def _linear(self, names: list[tuple[str, int | None]], bias: torch.Tensor | None = None,
                head: bool = False) -> SizedLinear:
        lin: SizedLinear
        if self.qlib is not None:
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

    def _load_layer(self, i: int) -> LayerWeights:
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
        return LayerWeights(
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
        self.emb_raw = self.store.raw(emb_name) if self.gguf else None
        if self.emb_raw is not None and self.mode != "f32":
            # quantised table: dequantise only the rows a step needs
            self.emb = None
        else:
            self.emb = self.store.get(emb_name).float()
        head_name = emb_name if self.cfg.tied else self._name("head")
        self.head = self._linear([(head_name, None)], head=True)
