"""Mixture-of-Experts decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) over a packed flash layout.

Routing is kept apart from expert compute (as in gpt-fast's MOEFeedForward vs
ConditionalFeedForward): ``moe_route`` holds pure functions reproducing transformers exactly;
``moe_experts.MoEExperts`` asks the ``ExpertStore`` for all experts a layer needs in one call and
sums their outputs in a fixed order; ``moe_spec.MoESpeculation`` is the speculative side (verify,
self-draft, the verify-cost prior). This module holds the model: construction, attention, the
forward passes and their accounting.

Shapes: T tokens in the step, H hidden, I expert intermediate, E experts, k top-k,
nh / nkv / hd attention heads / kv heads / head dim.

The attention side reuses ``local_engine.models.layers`` (RMSNorm, RoPE incl. scaling, GQA with
a preallocated KV cache, batched prefill); Qwen2-MoE's qkv bias and OLMoE's whole-projection
q/k norm are expressed as ``Linear`` callables. Resident weights are converted to fp32 once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from local_engine import kv_cache, qkernel, spec_control
from local_engine.cache import DEFAULT_POLICY
from local_engine.errors import PackError, UnsupportedArchitecture
from local_engine.expert_store import ExpertStore, StoreObserver, StoreSnapshot, peak_rss_bytes
from local_engine.formats.pack import (
    ARCHS,
    PACK_FORMAT,
    Manifest,
    dequantize_dense,
    load_resident,
    read_manifest,
)
from local_engine.models.base import CausalLM
from local_engine.models.layers import (
    Attends,
    KVCache,
    Linear,
    RopeTables,
    attention,
    linear,
    rms_norm,
    rope_inv_freq,
    swiglu,
)
from local_engine.models.moe_experts import MoEExperts
from local_engine.models.moe_route import DEFAULT_STANDIN_BELOW, router_for
from local_engine.models.moe_spec import MoESpeculation
from local_engine.models.moe_step import DecodeStep
from local_engine.prefetch_switch import PrefetchSwitch
from local_engine.quant import GGUFBlockLinear

__all__ = ["DEFAULT_STANDIN_BELOW", "MoEModel", "StreamCounters", "parse_bytes"]


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> Linear:
    return w if b is None else (lambda x: F.linear(x, w, b))


# --------------------------------------------------------------------------- model


@dataclass
class StreamCounters:
    """What a packed model ran and read since it opened (or ``reset_stats``): ``stats()`` reports it."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    io_wait_s: float = 0.0
    expert_compute_s: float = 0.0
    # decode-only I/O (prefill touches most experts of a layer at once; keep it apart)
    decode_bytes_read: int = 0
    decode_io_busy_s: float = 0.0
    decode_io_wait_s: float = 0.0
    decode_hits: int = 0
    decode_misses: int = 0
    tokens_processed: int = 0  # every token through forward(), whoever drives it (Engine or us)
    # speculative decoding: a verify is one decode forward over its k+1 positions (its time, reads,
    # hits and misses count as decode); self-draft forwards are counted apart and nowhere else
    verifies: int = 0
    verify_positions: int = 0
    draft_tokens: int = 0
    draft_s: float = 0.0


class MoEModel(MoEExperts, MoESpeculation, CausalLM):
    """A packed MoE checkpoint: resident tensors in RAM, experts through an ``ExpertStore``."""

    # A long prompt runs in chunks of this many tokens (sequence.ChunksPrefill), as the dense model's
    # do: a cancel is seen between two chunks, not after the whole prompt. Each chunk reads the union
    # of its tokens' experts; at a few hundred tokens that is already most of a layer's experts, so
    # chunking adds little I/O over one pass.
    prefill_chunk = 256

    def __init__(self, manifest: Manifest, store: ExpertStore, resident: dict[str, torch.Tensor]) -> None:
        self.m = manifest
        c = self.config = manifest.config
        self.store = store
        self.arch = manifest.arch
        self.spec = ARCHS[self.arch]  # the family's quirks (formats/pack.py)
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
        blocks = {k: v for k, v in resident.items() if manifest.resident_qtype(k)}
        self.w = {k: (v if v.dtype == torch.float32 else v.float()) for k, v in resident.items() if k not in blocks}
        # matrices stored as GGUF blocks (pack --dense int8|int4): qkernel.qmatmul, q|k|v fused
        self.lin: dict[str, Linear] = self._block_linears(manifest, blocks)
        rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
        try:
            self.inv_freq, self.attn_factor = rope_inv_freq(self.hd, theta, rp or None,
                                                            c.get("max_position_embeddings"))
        except ValueError as e:
            raise UnsupportedArchitecture(f"{manifest.root}: {e}") from None
        self._rope_tables: RopeTables | None = None
        mp = self.spec.moe_prefix
        self._moe_prefix = mp
        if "lm_head.weight" not in self.w and "lm_head.weight" not in self.lin:
            if not c.get("tie_word_embeddings", False):
                raise PackError(f"{manifest.root}: lm_head.weight missing and embeddings are not tied")
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.run = StreamCounters()
        self.max_seq = 4096
        self.kv_config = kv_cache.KVConfig()
        # next-layer prefetch: forced on/off, or chosen per token by a PrefetchSwitch ("auto")
        self.prefetch: bool | str = False
        self._switch: PrefetchSwitch | None = None
        # self-draft (speculative decoding): a token routed to this many of its top-k experts
        self.draft_experts = 1
        # low-bit stand-ins (store opened with a stand-in pack): a decode step's missed expert whose
        # router weight is below this is computed from its stand-in bundle instead of its own
        self.standin_below = 0.0
        # a one-token step's missed experts multiplied in their reader thread as their bytes land
        # (ExpertStore.request(work=...)), beside this thread's hits; off unless measured to pay
        self.overlap_misses = False
        self._drafting = False
        # speculative auto's prior (verify_cost_prior): the experts recent decode positions routed
        # to, and the share of a decode step's time spent on experts (reads + compute), averaged
        self.routes = spec_control.RouteWindow(len(self.moe_layers), int(manifest.num_experts))
        self._routing: list[torch.Tensor] | None = None  # this forward's idx per MoE layer, when kept
        self.expert_share: float | None = None
        order = sorted(self.moe_layers)
        self._next_moe = dict(itertools.pairwise(order))
        # a one-token forward over a plain KV cache: fused norms, attention in C (moe_step.py);
        # None (no C kernels, OLMoE) keeps every forward on the general path
        self.decode_step: DecodeStep | None = DecodeStep.build(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | Path, memory_budget: int | str = 0, policy: str = DEFAULT_POLICY, readers: int = 8,
             direct: bool = True, verify: str = "first", prefetch: bool | str = "auto",
             recorder: StoreObserver | None = None, standins: str | Path | None = None,
             standin_below: float = DEFAULT_STANDIN_BELOW) -> MoEModel:
        """``prefetch``: True, False, or "auto" = the decode tries both in interleaved blocks of
        tokens and keeps the faster, re-checking every 64 tokens (``PrefetchSwitch``): whether it
        pays depends on the disk and CPU more than on the budget. Off when the whole bank is
        cached (nothing left to read). ``readers``: the I/O threads.
        ``recorder``: told every expert request and read (benchmarks/cache_research.py's
        ``TraceRecorder`` keeps them for replays; None, the default, records nothing).
        ``standins``: a pack of the same model with cheaper experts (``pack --quant int2``); a decode
        step's expert that misses the cache and has a router weight below ``standin_below`` is
        computed from its stand-in bundle (half of int4's bytes) instead of its own."""
        m = read_manifest(path)
        budget = parse_bytes(memory_budget)
        k = int(m.config["num_experts_per_tok"])
        if not 0.0 <= standin_below <= 1.0:
            raise ValueError(f"standin_below must be a router weight in [0, 1], not {standin_below}")
        alt = read_manifest(standins) if standins is not None else None
        store = ExpertStore(m, budget, policy=policy, readers=readers, direct=direct, verify=verify,
                            min_resident_experts=k, observer=recorder, standins=alt)
        try:
            model = cls(m, store, load_resident(m))
        except BaseException:
            store.close()
            raise
        model.standin_below = standin_below if alt is not None else 0.0
        if prefetch == "auto":
            if budget < m.expert_bank_bytes:
                model.prefetch, model._switch = "auto", PrefetchSwitch()
        elif isinstance(prefetch, bool):
            model.prefetch = prefetch
        else:
            store.close()
            raise ValueError(f"prefetch must be true, false or 'auto', not {prefetch!r}")
        return model

    def close(self) -> None:
        self.store.close()

    def _block_linears(self, m: Manifest, blocks: dict[str, torch.Tensor]) -> dict[str, Linear]:
        """Kernels over the resident matrices a pack stores as GGUF blocks (``dense`` int8 / int4),
        biases included; q, k and v of a layer as one matrix (``<prefix>qkv``: one call, rows
        q|k|v) unless OLMoE's whole-projection norm needs them apart. Without the compiled kernel
        they are dequantised to fp32 once (the PyTorch path)."""
        if not blocks:
            return {}
        lib = qkernel.load()

        def shape(name: str) -> tuple[int, int]:
            r, c = m.raw["resident"]["tensors"][name]["shape"]
            return int(r), int(c)

        def make(names: list[str]) -> Linear:
            qt = {m.resident_qtype(n) for n in names}
            qtype = str(qt.pop())
            biases = [self.w.get(n.removesuffix("weight") + "bias") for n in names]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else torch.zeros(shape(n)[0]) for n, b in zip(names, biases, strict=True)])
            if lib is None:
                w = torch.cat([dequantize_dense(blocks[n], qtype, shape(n)) for n in names])
                return _with_bias(w, bias)
            data = blocks[names[0]].numpy() if len(names) == 1 else torch.cat([blocks[n] for n in names]).numpy()
            return GGUFBlockLinear(lib, data, qtype, (sum(shape(n)[0] for n in names), shape(names[0])[1]), bias)

        out: dict[str, Linear] = {}
        done: set[str] = set()
        for i in range(self.n_layers):
            p = f"model.layers.{i}.self_attn."
            qkv = [p + f"{x}_proj.weight" for x in "qkv"]
            if self.spec.qk_norm != "projection" and all(n in blocks for n in qkv) and len({m.resident_qtype(n) for n in qkv}) == 1:
                out[p + "qkv"] = make(qkv)
                done.update(qkv)
        for n in blocks:
            if n not in done:
                out[n] = make([n])
        return out

    def _linear(self, name: str) -> Linear:
        """A resident matrix as a Linear with its bias: its block kernel, or the fp32 weight."""
        if name in self.lin:
            return self.lin[name]
        return _with_bias(self.w[name], self.w.get(name.removesuffix("weight") + "bias"))

    def dense_bytes_per_token(self) -> int:
        """Bytes of resident weights one decode token reads: every matrix in full (attention,
        routers, shared experts, dense MLP layers, the vocab head) as held in memory (fp32, or
        GGUF blocks for a ``dense`` int8 / int4 pack), one embedding row; norms included."""
        emb = self.w["model.embed_tokens.weight"]
        n = emb.shape[1] * emb.element_size()
        n += sum(v.numel() * v.element_size() for k, v in self.w.items()
                 if k != "model.embed_tokens.weight" and not (k == "lm_head.weight" and v is emb))
        return n + sum(int(getattr(x, "nbytes", 0)) for x in self.lin.values())

    # ------------------------------------------------------------------ layers
    def _attn(self, i: int, h: torch.Tensor, cache: KVCache | Attends, pos0: int) -> torch.Tensor:
        p = f"model.layers.{i}.self_attn."
        w = self.w
        wqkv = self.lin.get(p + "qkv")
        wq = wk = wv = None
        if wqkv is None:
            wq, wk, wv = (self._linear(p + f"{x}_proj.weight") for x in "qkv")
        q_norm = k_norm = None
        if self.spec.qk_norm == "projection":  # normalised over the whole projection, before the head split
            assert wq is not None and wk is not None
            qw, kw, qn, kn = wq, wk, w[p + "q_norm.weight"], w[p + "k_norm.weight"]
            wq = lambda x: rms_norm(linear(x, qw), qn, self.eps)  # noqa: E731
            wk = lambda x: rms_norm(linear(x, kw), kn, self.eps)  # noqa: E731
        elif self.spec.qk_norm == "head":
            q_norm, k_norm = w[p + "q_norm.weight"], w[p + "k_norm.weight"]
        # a compressed / bounded cache brings its own RoPE (positions past any table: kv_cache.py)
        n_pos = pos0 + h.shape[0] if isinstance(cache, KVCache) else 0
        return attention(h, layer=i, start=pos0, wq=wq, wk=wk, wv=wv, wo=self._linear(p + "o_proj.weight"),
                         n_heads=self.nh, n_kv_heads=self.nkv, head_dim=self.hd, rope=self._rope(n_pos),
                         cache=cache, q_norm=q_norm, k_norm=k_norm, eps=self.eps, wqkv=wqkv)

    def _rope(self, n_pos: int) -> RopeTables:
        if self._rope_tables is None or self._rope_tables.max_pos < n_pos:
            self._rope_tables = RopeTables(self.inv_freq, max(n_pos, 4096), self.attn_factor)
        return self._rope_tables

    def _dense_mlp(self, prefix: str, h: torch.Tensor) -> torch.Tensor:
        return swiglu(h, *(self._linear(prefix + f"{x}_proj.weight") for x in ("gate", "up", "down")))

    # ------------------------------------------------------------------ batched decode
    @torch.inference_mode()
    def step_batch(self, ids: torch.Tensor, caches: list[Any]) -> torch.Tensor:
        """One decode token for each of B sequences (local_engine/scheduler.py): ``ids`` [B], token
        b after ``caches[b]``'s tokens; logits [B, vocab].

        Attention runs per sequence over its own cache; each MoE layer asks the store once for the
        union of the B tokens' experts (``_moe`` requests ``unique(idx)``), so an expert two
        sequences share is read, and its matrices multiplied, once per step. Accounted as B decode
        tokens (time, bytes, hits, misses); no next-layer prefetch (its guess would be the union
        of B guesses) and no prefetch-switch sample (a batched step's time is not one token's)."""
        B = ids.shape[0]
        if B == 1:
            return self.forward(ids, caches[0], last_only=True)
        r = self.run
        before = self.store.snapshot()
        t0 = time.perf_counter()
        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.n_layers):
            lp = f"model.layers.{i}."
            h = rms_norm(x, self.w[lp + "input_layernorm.weight"], self.eps)
            x = x + torch.cat([self._attn(i, h[b:b + 1], c, c.length) for b, c in enumerate(caches)])
            h = rms_norm(x, self.w[lp + "post_attention_layernorm.weight"], self.eps)
            x = x + (self._moe(i, h, True) if i in self.moe_layers else self._dense_mlp(lp + "mlp.", h))
        for c in caches:
            c.advance(1)
        out = linear(rms_norm(x, self.w["model.norm.weight"], self.eps), self._linear("lm_head.weight"))
        r.tokens_processed += B
        self._count_decode(self.store.snapshot() - before, time.perf_counter() - t0, B)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, cache: KVCache | Attends, last_only: bool = False) -> torch.Tensor:
        """ids [T] -> logits [T, vocab] (or [1, vocab] with ``last_only``); appends to ``cache``.

        Accounts every call, whoever drives it (``Engine`` or ``generate_ids``): one token is a
        decode step, more is a prefill micro-batch.
        """
        r = self.run
        before = self.store.snapshot()
        decode = ids.shape[0] == 1  # a prefill batch would guess most experts: never prefetch there
        sw = self._switch if decode else None
        prefetch = decode and (sw.choose() if sw is not None else self.prefetch is True)
        compute0 = r.expert_compute_s
        t0 = time.perf_counter()
        self._routing = [] if decode else None
        try:
            out = self._forward(ids, cache, last_only, prefetch)
        finally:
            routing, self._routing = self._routing, None
        dt = time.perf_counter() - t0
        if sw is not None:
            sw.record(prefetch, dt)
        delta = self.store.snapshot() - before
        if decode:
            self._learn_step(routing, dt, delta.io_wait_s + r.expert_compute_s - compute0)
            self._count_decode(delta, dt, 1)
        else:
            r.io_wait_s += delta.io_wait_s
            r.prefill_s += dt
            r.prefill_tokens += ids.shape[0]
        return out

    def _count_decode(self, delta: StoreSnapshot, seconds: float, tokens: int) -> None:
        """Account ``tokens`` decode tokens that took ``seconds`` and did ``delta`` in the store."""
        r = self.run
        r.decode_s += seconds
        r.decode_tokens += tokens
        r.io_wait_s += delta.io_wait_s
        r.decode_bytes_read += delta.bytes_read
        r.decode_io_busy_s += delta.io_busy_s
        r.decode_io_wait_s += delta.io_wait_s
        r.decode_hits += delta.hits
        r.decode_misses += delta.misses

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, cache: KVCache | Attends, last_only: bool, prefetch: bool,
                 decode: bool = False) -> torch.Tensor:
        """``decode``: ``ids`` are decode positions (a verify's), not a prompt's (``_moe``)."""
        if ids.shape[0] == 1 and self.decode_step is not None and isinstance(cache, KVCache):
            return self.decode_step(ids, cache, prefetch, decode)
        x = self.w["model.embed_tokens.weight"][ids]
        pos0 = cache.length
        for i in range(self.n_layers):
            lp = f"model.layers.{i}."
            x = x + self._attn(i, rms_norm(x, self.w[lp + "input_layernorm.weight"], self.eps), cache, pos0)
            h = rms_norm(x, self.w[lp + "post_attention_layernorm.weight"], self.eps)
            x = x + (self._moe(i, h, decode) if i in self.moe_layers else self._dense_mlp(lp + "mlp.", h))
            if prefetch:
                self._prefetch_after(i, x)
        cache.advance(ids.shape[0])
        self.run.tokens_processed += ids.shape[0]
        if last_only:
            x = x[-1:]
        x = rms_norm(x, self.w["model.norm.weight"], self.eps)
        return linear(x, self._linear("lm_head.weight"))

    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        return self.forward(ids, self.new_cache(ids.shape[0]))

    def new_cache(self, max_seq: int | None = None) -> KVCache | kv_cache.CompressedKVCache:
        n = max_seq or self.max_seq
        if not self.kv_config.plain:
            return kv_cache.new_cache(self.kv_config, self.n_layers, self.nkv, self.hd, n, self._rope(n))
        return KVCache(self.n_layers, self.nkv, self.hd, n)

    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim): what a KV cache row costs (kv_cache.bytes_per_token)."""
        return self.n_layers, self.nkv, self.hd

    def memory_bytes(self) -> dict[str, int]:
        """Resident tensors, and the expert cache's budget (at most the whole bank)."""
        return {"weights_bytes": int(self.m.resident_bytes),
                "expert_cache_bytes": int(min(self.store.budget_bytes, self.m.expert_bank_bytes))}

    def describe(self) -> dict[str, Any]:
        """For ``Engine.info()``."""
        return {"arch": self.arch, "format": PACK_FORMAT, "quant": self.m.quant, "dense": self.m.dense,
                "layers": self.n_layers, "moe_layers": len(self.moe_layers), "experts": self.m.num_experts,
                "top_k": self.top_k, "bundle_bytes": self.m.stride, "expert_bank_bytes": self.m.expert_bank_bytes,
                "resident_bytes": self.m.resident_bytes, "cache_budget_bytes": self.store.budget_bytes,
                "cache_policy": self.store.policy, "o_direct": self.store.direct,
                "working_set_bytes": self.store.working_set_bytes, "prefetch": self.prefetch,
                "standins": self.store.standins_quant, "standin_below": self.standin_below}

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int,
                     stop_ids: set[int] | None = None,
                     sample: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        """Greedy (or ``sample``) decoding: prefill as one micro-batch, then one token per step."""
        cache = self.new_cache(len(prompt_ids) + max_new_tokens)
        pick = sample or (lambda lg: int(torch.argmax(lg).item()))
        lg = self.forward(torch.as_tensor(prompt_ids, dtype=torch.long), cache)[-1]
        for _ in range(max_new_tokens):
            tok = pick(lg)
            yield tok
            if stop_ids and tok in stop_ids:
                break
            lg = self.forward(torch.tensor([tok], dtype=torch.long), cache)[-1]

    def reset_stats(self) -> None:
        self.run = StreamCounters()
        self.store.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Streaming stats for ``--stats`` / metrics: speed, I/O, cache, memory."""
        s = self.store.stats()
        r = self.run
        toks = r.tokens_processed
        total_s = r.decode_s + r.prefill_s
        return {
            "prefill_tokens": r.prefill_tokens,
            "prefill_tok_s": r.prefill_tokens / r.prefill_s if r.prefill_s else 0.0,
            "decode_tokens": r.decode_tokens,
            "decode_tok_s": r.decode_tokens / r.decode_s if r.decode_s else 0.0,
            "bytes_read_per_token": s["bytes_read"] / toks if toks else 0.0,
            "decode_bytes_read_per_token": r.decode_bytes_read / r.decode_tokens if r.decode_tokens else 0.0,
            "decode_hit_rate": r.decode_hits / max(r.decode_hits + r.decode_misses, 1),
            "decode_read_bandwidth_Bps": r.decode_bytes_read / r.decode_io_busy_s if r.decode_io_busy_s else 0.0,
            "decode_io_wait_s": r.decode_io_wait_s,
            "hit_rate": s["cache_hit_rate"],
            "read_bandwidth_Bps": s["read_bandwidth_Bps"],
            "io_wait_s": r.io_wait_s,
            "compute_s": max(total_s - r.io_wait_s, 0.0),
            "expert_compute_s": r.expert_compute_s,
            "standin_uses": s["standin_uses"],
            "standin_below": self.standin_below,
            "spec_verifies": r.verifies,
            "spec_verify_positions": r.verify_positions,
            "spec_draft_tokens": r.draft_tokens,
            "spec_draft_s": r.draft_s,
            "peak_rss_bytes": peak_rss_bytes(),
            "resident_bytes": self.m.resident_bytes,
            "dense_bytes_per_token": self.dense_bytes_per_token(),
            "expert_bank_bytes": self.m.expert_bank_bytes,
            **{f"store_{k}": v for k, v in s.items()},
            **(self._switch.stats() if self._switch is not None else {}),
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
