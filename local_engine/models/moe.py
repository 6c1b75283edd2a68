"""Mixture-of-Experts decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) over a packed flash layout.

Routing is kept apart from expert compute (as in gpt-fast's MOEFeedForward vs
ConditionalFeedForward): ``route_*`` are pure functions reproducing transformers exactly;
``MoEBlock`` asks the ``ExpertStore`` for all experts a layer needs in one call and computes
each as it arrives (hits first, then reads in completion order), then sums the per-expert
outputs in ascending expert order so results do not depend on I/O timing (and match HF's
summation order).

Shapes: T tokens in the step, H hidden, I expert intermediate, E experts, k top-k,
nh / nkv / hd attention heads / kv heads / head dim.

The attention side is plain fp32 PyTorch (RMSNorm, RoPE, GQA with a KV cache, batched
prefill); resident weights are converted to fp32 once at load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from local_engine.expert_store import ExpertStore, peak_rss_bytes
from local_engine.formats.pack import (
    Manifest,
    PackError,
    UnsupportedArchitecture,
    load_resident,
    read_manifest,
)

# --------------------------------------------------------------------------- routing (pure)


def route_mixtral(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax in fp32 -> top-k -> renormalise (always). Returns (weights [T,k], idx [T,k])."""
    probs = F.softmax(router_logits.float(), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def route_qwen(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-MoE / Qwen3-MoE / OLMoE: softmax fp32 -> top-k -> renormalise only if configured."""
    probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(router_logits.dtype), idx


def router_for(config: dict[str, Any]) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    k = int(config["num_experts_per_tok"])
    if config["model_type"] == "mixtral":
        return lambda lg: route_mixtral(lg, k)
    norm = bool(config.get("norm_topk_prob", False))
    return lambda lg: route_qwen(lg, k, norm)


# --------------------------------------------------------------------------- small ops


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rope_inv_freq(config: dict[str, Any], head_dim: int) -> torch.Tensor:
    rp = config.get("rope_parameters") or {}
    theta = float(rp.get("rope_theta", config.get("rope_theta", 10000.0)))
    rtype = rp.get("rope_type", "default")
    scaling = config.get("rope_scaling")
    if rtype not in ("default", None) or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise UnsupportedArchitecture(f"rope type {rtype!r} / scaling {scaling!r} is not supported for MoE models yet")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n, hd]; HF rotate_half convention."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down)


# --------------------------------------------------------------------------- model


@dataclass
class KVCache:
    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([None] * n_layers, [None] * n_layers)


@dataclass
class RunStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    io_wait_s: float = 0.0
    expert_compute_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class MoEModel:
    """A packed MoE checkpoint: resident tensors in RAM, experts through an ``ExpertStore``."""

    def __init__(self, manifest: Manifest, store: ExpertStore, resident: dict[str, torch.Tensor]) -> None:
        self.m = manifest
        c = self.config = manifest.config
        self.store = store
        self.arch = manifest.arch
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"{manifest.root}: activation {c.get('hidden_act')!r} unsupported")
        self.H = int(c["hidden_size"])
        self.nh = int(c["num_attention_heads"])
        self.nkv = int(c.get("num_key_value_heads") or self.nh)
        self.hd = int(c.get("head_dim") or self.H // self.nh)
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.n_layers = int(c["num_hidden_layers"])
        self.top_k = int(c["num_experts_per_tok"])
        self.route = router_for(c)
        self.moe_layers = set(manifest.moe_layers)
        self.w = {k: (v if v.dtype == torch.float32 else v.float()) for k, v in resident.items()}
        self.inv_freq = rope_inv_freq(c, self.hd)
        mp = "block_sparse_moe" if self.arch == "mixtral" else "mlp"
        self._moe_prefix = mp
        if "lm_head.weight" not in self.w:
            if not c.get("tie_word_embeddings", False):
                raise PackError(f"{manifest.root}: lm_head.weight missing and embeddings are not tied")
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.run = RunStats()

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | Path, memory_budget: int | str = 0, policy: str = "lfu-da", threads: int = 8,
             direct: bool = True, verify: str = "first") -> MoEModel:
        m = read_manifest(path)
        budget = parse_bytes(memory_budget)
        k = int(m.config["num_experts_per_tok"])
        store = ExpertStore(m, budget, policy=policy, threads=threads, direct=direct, verify=verify,
                            min_resident_experts=k)
        try:
            return cls(m, store, load_resident(m))
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ layers
    def _attn(self, i: int, h: torch.Tensor, cache: KVCache, pos0: int) -> torch.Tensor:
        p = f"model.layers.{i}.self_attn."
        w = self.w
        T = h.shape[0]
        q = F.linear(h, w[p + "q_proj.weight"], w.get(p + "q_proj.bias"))
        k = F.linear(h, w[p + "k_proj.weight"], w.get(p + "k_proj.bias"))
        v = F.linear(h, w[p + "v_proj.weight"], w.get(p + "v_proj.bias"))
        if self.arch == "olmoe":  # OLMoE normalises the whole projection before the head split
            q = rms_norm(q, w[p + "q_norm.weight"], self.eps)
            k = rms_norm(k, w[p + "k_norm.weight"], self.eps)
        q = q.view(T, self.nh, self.hd)
        k = k.view(T, self.nkv, self.hd)
        v = v.view(T, self.nkv, self.hd)
        if self.arch == "qwen3_moe":  # Qwen3: per-head q/k RMSNorm
            q = rms_norm(q, w[p + "q_norm.weight"], self.eps)
            k = rms_norm(k, w[p + "k_norm.weight"], self.eps)
        pos = torch.arange(pos0, pos0 + T, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [nkv, T, hd]
        if cache.k[i] is not None:
            kt = torch.cat((cache.k[i], kt), dim=1)
            vt = torch.cat((cache.v[i], vt), dim=1)
        cache.k[i], cache.v[i] = kt, vt
        rep = self.nh // self.nkv
        kr = kt.repeat_interleave(rep, dim=0)
        vr = vt.repeat_interleave(rep, dim=0)
        S = kr.shape[1]
        qpos = torch.arange(pos0, pos0 + T)[:, None]
        kpos = torch.arange(S)[None, :]
        mask = kpos <= qpos  # causal with an offset for cached keys
        o = F.scaled_dot_product_attention(q.transpose(0, 1), kr, vr, attn_mask=mask,
                                           scale=1.0 / math.sqrt(self.hd))
        return F.linear(o.transpose(0, 1).reshape(T, self.nh * self.hd), w[p + "o_proj.weight"])

    def _dense_mlp(self, prefix: str, h: torch.Tensor) -> torch.Tensor:
        w = self.w
        g = F.linear(h, w[prefix + "gate_proj.weight"])
        u = F.linear(h, w[prefix + "up_proj.weight"])
        return F.linear(F.silu(g) * u, w[prefix + "down_proj.weight"])

    def _moe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{i}.{self._moe_prefix}."
        weights, idx = self.route(F.linear(h, self.w[p + "gate.weight"]))
        experts = torch.unique(idx).tolist()  # ascending; all requested at once
        results: dict[int, torch.Tensor] = {}
        toks: dict[int, torch.Tensor] = {}
        for e, buf in self.store.request(i, experts):
            t0 = time.perf_counter()
            tok, slot = torch.where(idx == e)
            gate_up, down = self.store.weights(buf)
            results[e] = swiglu(h[tok], gate_up, down) * weights[tok, slot, None]
            toks[e] = tok
            self.run.expert_compute_s += time.perf_counter() - t0
        out = torch.zeros_like(h)
        for e in experts:  # fixed order: independent of which read finished first
            out.index_add_(0, toks[e], results[e].to(out.dtype))
        if self.arch == "qwen2_moe" and (p + "shared_expert.gate_proj.weight") in self.w:
            shared = self._dense_mlp(p + "shared_expert.", h)
            out = out + torch.sigmoid(F.linear(h, self.w[p + "shared_expert_gate.weight"])) * shared
        return out

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids [T] -> logits [T, vocab]; appends to ``cache``."""
        x = self.w["model.embed_tokens.weight"][ids]
        pos0 = cache.length
        for i in range(self.n_layers):
            lp = f"model.layers.{i}."
            x = x + self._attn(i, rms_norm(x, self.w[lp + "input_layernorm.weight"], self.eps), cache, pos0)
            h = rms_norm(x, self.w[lp + "post_attention_layernorm.weight"], self.eps)
            x = x + (self._moe(i, h) if i in self.moe_layers else self._dense_mlp(lp + "mlp.", h))
        cache.length += ids.shape[0]
        x = rms_norm(x, self.w["model.norm.weight"], self.eps)
        return F.linear(x, self.w["lm_head.weight"])

    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        return self.forward(ids, KVCache.empty(self.n_layers))

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int,
                     stop_ids: set[int] | None = None,
                     sample: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        """Greedy (or ``sample``) decoding: prefill as one micro-batch, then one token per step."""
        cache = KVCache.empty(self.n_layers)
        pick = sample or (lambda lg: int(torch.argmax(lg).item()))
        w0 = self.store.io.io_wait_s
        t0 = time.perf_counter()
        lg = self.forward(torch.as_tensor(prompt_ids, dtype=torch.long), cache)[-1]
        self.run.prefill_s += time.perf_counter() - t0
        self.run.prefill_tokens += len(prompt_ids)
        for _ in range(max_new_tokens):
            tok = pick(lg)
            yield tok
            if stop_ids and tok in stop_ids:
                break
            t0 = time.perf_counter()
            lg = self.forward(torch.tensor([tok], dtype=torch.long), cache)[-1]
            self.run.decode_s += time.perf_counter() - t0
            self.run.decode_tokens += 1
        self.run.io_wait_s += self.store.io.io_wait_s - w0

    def reset_stats(self) -> None:
        self.run = RunStats()
        self.store.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Streaming stats for ``--stats`` / metrics: speed, I/O, cache, memory."""
        s = self.store.stats()
        r = self.run
        toks = r.decode_tokens + r.prefill_tokens
        total_s = r.decode_s + r.prefill_s
        return {
            "prefill_tokens": r.prefill_tokens,
            "prefill_tok_s": r.prefill_tokens / r.prefill_s if r.prefill_s else 0.0,
            "decode_tokens": r.decode_tokens,
            "decode_tok_s": r.decode_tokens / r.decode_s if r.decode_s else 0.0,
            "bytes_read_per_token": s["bytes_read"] / toks if toks else 0.0,
            "hit_rate": s["cache_hit_rate"],
            "read_bandwidth_Bps": s["read_bandwidth_Bps"],
            "io_wait_s": s["io_wait_s"],
            "compute_s": max(total_s - s["io_wait_s"], 0.0),
            "expert_compute_s": r.expert_compute_s,
            "peak_rss_bytes": peak_rss_bytes(),
            "resident_bytes": self.m.resident_bytes,
            "expert_bank_bytes": self.m.expert_bank_bytes,
            **{f"store_{k}": v for k, v in s.items()},
        }


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12}


def parse_bytes(v: int | str | None) -> int:
    """``"2GiB"``, ``"500MB"``, ``1234`` -> bytes. None means unlimited."""
    if v is None:
        return 2**62
    if isinstance(v, int):
        return v
    s = v.strip().lower().replace(" ", "")
    if s in ("inf", "unlimited", "none"):
        return 2**62
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"cannot parse memory size {v!r} (e.g. 512MiB, 2GiB, 0)")
    return int(float(num) * _UNITS[unit])
