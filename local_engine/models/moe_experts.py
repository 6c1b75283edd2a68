"""A packed MoE layer's expert work: ask the ``ExpertStore`` once for every expert the layer's
tokens route to, multiply each as it arrives (hits first, then reads in completion order), and sum
the per-expert outputs in ascending expert order, so results do not depend on I/O timing (and match
HF's summation order). One token (a decode step) and a few (a speculative verify's rows) run the
fused one-token kernel per expert (``qkernel.gq_expert``); a prefill chunk the general path.
Also the next-layer prefetch guess and the self-draft's routing. Mixed into ``MoEModel``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from local_engine.expert_store import ExpertStore
from local_engine.formats.pack import ArchSpec
from local_engine.models.layers import Linear, rms_norm, swiglu
from local_engine.models.moe_route import standin_candidates
from local_engine.quant import GroupExpert

# a decode forward of at most this many rows (a speculative verify, a batched step) runs its
# experts through the one-token kernel row by row (``_moe_rows``); a prompt through the general path
FUSED_ROWS_MAX = 16


def _expert_swiglu(x: torch.Tensor, gate_up: Linear, down: Linear) -> torch.Tensor:
    """One expert: fp32 matrices (none/int8/int4, dequantised) or packed int2 ``Int2Linear``s."""
    return swiglu(x, None, None, down, w_gate_up=gate_up)


class MoEExperts:
    """``MoEModel``'s expert side (what it reads from the model is declared here)."""

    store: ExpertStore
    run: Any  # moe.StreamCounters: expert_compute_s
    w: dict[str, torch.Tensor]
    H: int
    eps: float
    spec: ArchSpec
    route: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    _moe_prefix: str
    _next_moe: dict[int, int]
    draft_experts: int
    standin_below: float
    overlap_misses: bool
    _drafting: bool
    _routing: list[torch.Tensor] | None

    def _dense_mlp(self, prefix: str, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _moe(self, i: int, h: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """Layer ``i``'s experts for ``h`` [T, H]; ``decode``: the rows are decode positions (a
        verify's, a batched step's), not a prompt's: a few of them take the one-token kernel."""
        p = f"model.layers.{i}.{self._moe_prefix}."
        logits = F.linear(h, self.w[p + "gate.weight"])
        weights, idx = self.route(logits)
        if self._drafting:
            weights, idx = self._draft_route(i, logits)
        elif self._routing is not None:
            self._routing.append(idx)
        if self.store.expert_fn is not None:
            if h.shape[0] == 1:
                return self._moe_one(i, h, logits, weights, idx, self.store.expert_fn)
            if decode and h.shape[0] <= FUSED_ROWS_MAX:
                return self._moe_rows(i, h, logits, weights, idx, self.store.expert_fn)
        uniq, counts = torch.unique(idx, return_counts=True)  # ascending; all requested at once
        experts = uniq.tolist()
        probs = self._router_probs(logits)
        results: dict[int, torch.Tensor] = {}
        toks: dict[int, torch.Tensor] = {}
        for e, buf, _ in self.store.request(i, experts, counts.tolist(), h.shape[0], probs=probs):
            t0 = time.perf_counter()
            tok, slot = torch.where(idx == e)
            gate_up, down = self.store.weights(buf)
            results[e] = _expert_swiglu(h[tok], gate_up, down) * weights[tok, slot, None]
            toks[e] = tok
            self.run.expert_compute_s += time.perf_counter() - t0
        out = torch.zeros_like(h)
        for e in experts:  # fixed order: independent of which read finished first
            out.index_add_(0, toks[e], results[e].to(out.dtype))
        return self._plus_shared(p, h, out)

    def _router_probs(self, logits: torch.Tensor) -> list[float] | None:
        """The router's view of ALL experts (mean over the step's tokens), for router-aware cache
        policies: where hidden states drift slowly, it predicts the next tokens' picks (see
        router_policy.RouterLFU). None unless such a policy or a recorded trace wants it: it is on
        every layer's hot path."""
        if not self.store.wants_router_probs:
            return None
        probs: list[float] = F.softmax(logits, dim=-1, dtype=torch.float).mean(0).tolist()
        return probs

    def _plus_shared(self, p: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus Qwen2-MoE's gated shared expert of ``h`` where the layer (prefix ``p``) has one."""
        if self.spec.shared_expert and (p + "shared_expert_gate.weight") in self.w:
            shared = self._dense_mlp(p + "shared_expert.", h)
            out = out + torch.sigmoid(F.linear(h, self.w[p + "shared_expert_gate.weight"])) * shared
        return out

    def _moe_rows(self, i: int, h: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                  expert: GroupExpert) -> torch.Tensor:
        """``_moe`` for a few tokens (a speculative verify's rows) of grouped int2 / int4 experts: the
        union of their experts requested once, each expert run by the one-token kernel for every
        row routed to it. The general path's per-expert tensor ops cost more than a step's whole
        expert work at 2-4 rows; and each row's output is summed as ``_moe_one`` sums it (its
        experts in ascending order), so a row comes out as a step over the same input would."""
        T = h.shape[0]
        picks = idx.tolist()
        ws = weights.float().tolist()
        uniq, counts = torch.unique(idx, return_counts=True)
        experts = uniq.tolist()
        # row r's experts ascending: expert e of row r goes to ys[r, slot[r][e]] with weight w
        rows: dict[int, list[tuple[int, int, float]]] = {e: [] for e in experts}
        for r in range(T):
            order = sorted(range(len(picks[r])), key=picks[r].__getitem__)
            for s, j in enumerate(order):
                rows[picks[r][j]].append((r, s, ws[r][j]))
        probs = self._router_probs(logits)
        x = h.float().contiguous()
        ys = torch.empty(T, idx.shape[1], self.H)
        for e, buf, _ in self.store.request(i, experts, counts.tolist(), T, probs=probs):
            t0 = time.perf_counter()
            for r, s, w in rows[e]:
                expert(buf, x[r], w, ys[r, s])
            self.run.expert_compute_s += time.perf_counter() - t0
        out = torch.cat([ys[r].sum(0, keepdim=True) for r in range(T)]).to(h.dtype)
        return self._plus_shared(f"model.layers.{i}.{self._moe_prefix}.", h, out)

    def _moe_one(self, i: int, h: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                 expert: GroupExpert) -> torch.Tensor:
        """``_moe`` for one token of grouped int2 / int4 experts: one kernel call per expert, no
        per-expert tensor ops (at small budgets those, each releasing and re-taking the GIL the
        reader threads contend for, cost more than the experts' arithmetic). Each expert's output
        goes to its row in ascending expert order, and the rows are summed in that order, so the
        result does not depend on which read finished first."""
        picks = idx[0].tolist()
        ws = weights[0].float().tolist()
        order = sorted(range(len(picks)), key=picks.__getitem__)
        experts = [picks[j] for j in order]
        row = {e: r for r, e in enumerate(experts)}
        probs = self._router_probs(logits)
        x = h[0].float().contiguous()
        ys = torch.empty(len(experts), self.H)
        alt = self.store.standin_fn
        ok = standin_candidates(picks, ws, self.standin_below) if alt is not None and not self._drafting else ()

        def work(e: int, buf: Any, standin: bool) -> None:  # a hit's here, a miss's in its reader thread
            r = row[e]
            (alt if standin and alt is not None else expert)(buf, x, ws[order[r]], ys[r])

        if self.overlap_misses:
            t0, before = time.perf_counter(), self.store.snapshot()
            for _ in self.store.request(i, experts, [1] * len(experts), 1, probs=probs, standin_ok=ok, work=work):
                pass
            # this thread's share: hits' compute and bookkeeping (misses': store stats offloaded_compute_s)
            waited = (self.store.snapshot() - before).io_wait_s
            self.run.expert_compute_s += time.perf_counter() - t0 - waited
        else:
            for e, buf, standin in self.store.request(i, experts, [1] * len(experts), 1, probs=probs, standin_ok=ok):
                t0 = time.perf_counter()
                work(e, buf, standin)
                self.run.expert_compute_s += time.perf_counter() - t0
        return self._plus_shared(f"model.layers.{i}.{self._moe_prefix}.", h, ys.sum(0, keepdim=True).to(h.dtype))

    def _prefetch_after(self, i: int, x: torch.Tensor) -> None:
        """Guess the next MoE layer's experts from this layer's output and start reading them.

        The next layer's router sees ``norm(x + attn(x))``; ``norm(x)`` skips the attention
        update, which the residual stream mostly survives, so the guess overlaps that layer's
        attention with the reads. Decode only: a prefill batch would guess most experts.
        """
        j = self._next_moe.get(i)
        if j is None:
            return
        p = f"model.layers.{j}."
        h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], self.eps)
        _, idx = self.route(F.linear(h, self.w[p + self._moe_prefix + ".gate.weight"]))
        self.store.prefetch(j, torch.unique(idx).tolist())

    def _draft_route(self, layer: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-draft's routing of one token: its ``draft_experts`` likeliest experts among
        those already in the expert cache (a draft that read from disk would cost what it saves:
        on a cold cache it read ~1.8x the bytes per token of plain decoding), the likeliest
        overall when none is cached; weights renormalised over the picks."""
        order = torch.argsort(logits[0], descending=True).tolist()
        cached = [e for e in order if self.store.holds(layer, e)]
        pick = (cached or order)[:self.draft_experts]
        w = F.softmax(logits[0, pick].float(), dim=-1)
        return w[None].to(logits.dtype), torch.tensor([pick])
