"""A packed MoE's side of speculative decoding (local_engine/speculative.py): the verify forward
(the union of its positions' experts read once per layer), the self-draft (the same model on fewer
experts per token), and the prior that prices a verify before one was measured (spec_control).
Mixed into ``MoEModel``."""

from __future__ import annotations

import time
from typing import Any

import torch

from local_engine import spec_control
from local_engine.expert_store import ExpertStore, StoreSnapshot
from local_engine.models.layers import Attends, KVCache


class MoESpeculation:
    """``MoEModel``'s speculative entry points (what they read from the model is declared here)."""

    store: ExpertStore
    run: Any  # moe.StreamCounters
    routes: spec_control.RouteWindow
    expert_share: float | None
    _drafting: bool
    _routing: list[torch.Tensor] | None

    def _forward(self, ids: torch.Tensor, cache: KVCache | Attends, last_only: bool, prefetch: bool,
                 decode: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def _count_decode(self, delta: StoreSnapshot, seconds: float, tokens: int) -> None:
        raise NotImplementedError

    def verify_forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """``forward`` for a speculative verify of ``ids`` (last token + drafts) after the cache.

        Each MoE layer asks the store once for the union of the k+1 positions' experts (``_moe``
        requests ``unique(idx)``): an expert two drafts share is read once. Accounted as one decode
        forward (time, bytes, hits, misses), not as a prefill; no next-layer prefetch (its guess
        would be the union of k+1 guesses) and no prefetch-switch sample (a verify's time is not a
        step's)."""
        r = self.run
        before = self.store.snapshot()
        t0 = time.perf_counter()
        self._routing = []
        try:
            out = self._forward(ids, cache, False, False, decode=True)
        finally:
            routing, self._routing = self._routing, None
        self.routes.add(routing)  # each verified position routes like a step's
        self._count_decode(self.store.snapshot() - before, time.perf_counter() - t0, 1)
        r.verifies += 1
        r.verify_positions += ids.shape[0]
        return out

    def _learn_step(self, routing: list[torch.Tensor] | None, seconds: float, expert_s: float) -> None:
        """A decode step's experts and its expert share of time, for ``verify_cost_prior``."""
        if routing:
            self.routes.add(routing)
        if seconds > 0:
            share = min(expert_s / seconds, 1.0)
            self.expert_share = share if self.expert_share is None else 0.75 * self.expert_share + 0.25 * share

    def verify_cost_prior(self, max_rows: int) -> list[float] | None:
        """An m-row verify's seconds in single steps before any was measured (``speculative.
        VerifyCostPrior``): its experts are the union of its positions', priced from the recent
        positions' routing and a step's expert share of time (spec_control.moe_prior)."""
        if self.expert_share is None or not len(self.routes):
            return None
        return spec_control.moe_prior(self.routes.union_sizes(max_rows), self.expert_share, max_rows - 1)

    def self_draft(self, last: int, cache: KVCache, k: int) -> list[int]:
        """Up to ``k`` greedy tokens after ``last`` from the same model routed to ``draft_experts``
        expert per token, cached ones first (``_draft_route``): same attention, same KV cache, no
        second checkpoint. The KV cache is left as it was: the verify that follows rewrites the
        draft's rows."""
        base, out, tok = cache.length, [], last
        t0 = time.perf_counter()
        self._drafting = True
        try:
            for _ in range(k):
                logits = self._forward(torch.tensor([tok], dtype=torch.long), cache, True, False)
                tok = int(logits[-1].argmax())
                out.append(tok)
        finally:
            self._drafting = False
            cache.crop(base)
            self.run.tokens_processed -= len(out)  # _forward counted them: drafts are not model tokens
            self.run.draft_tokens += len(out)
            self.run.draft_s += time.perf_counter() - t0
        return out
