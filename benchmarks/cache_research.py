"""Research instruments for the expert cache: offline replays and a routing recorder.

Not part of the runtime (local_engine/cache.py, expert_store.py); the benchmarks
(moe_stream.py, moe_online_bound.py) and tests/moe/test_cache.py use them:

- ``TraceRecorder``: an ``expert_store.StoreObserver`` that keeps every request (layer, experts,
  tokens per expert, the router's probabilities) and every batch of file slots read together, so a
  run's routing can be replayed on other policies and budgets. It grows with every token:
  ``MoEModel.open(..., recorder=TraceRecorder())`` in a benchmark, never in a server.
- ``replay``: a trace replayed on an item-bounded ``ExpertCache`` of any policy.
- ``belady_hits``: the optimal offline hit count (Belady's MIN) on the same trace.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from local_engine.cache import CacheStats, ExpertCache, Key


@dataclass
class TraceRecorder:
    """What an ``ExpertStore`` was asked for and read, step by step (see module docstring)."""

    trace: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (layer, experts) per step
    trace_uses: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (tokens, tokens per expert)
    # router probabilities over all experts per step (mean over its tokens), None where not given
    trace_probs: list[tuple[float, ...] | None] = field(default_factory=list)
    # file slots read together, per request (misses) or prefetch call: lets a benchmark replay the pattern
    read_batches: list[tuple[int, ...]] = field(default_factory=list)

    wants_router_probs = True

    def requested(self, layer: int, experts: Sequence[int], n_tokens: int, uses: Sequence[int],
                  probs: Sequence[float] | None) -> None:
        self.trace.append((layer, tuple(experts)))
        self.trace_uses.append((n_tokens, tuple(uses)))
        self.trace_probs.append(tuple(probs) if probs is not None else None)

    def read(self, slots: Sequence[int]) -> None:
        self.read_batches.append(tuple(slots))


def replay(trace: Sequence[Sequence[Key]], capacity: int, policy: str,
           uses: Sequence[tuple[int, Sequence[int]]] | None = None,
           probs: Sequence[Sequence[float] | None] | None = None, **policy_opts: Any) -> CacheStats:
    """Replay a trace of steps (each: the keys one layer needs at once) on an item-bounded cache.

    Keys of one step are pinned together, mirroring the runtime (a layer's experts are all in
    use during its step). A step's group (its layer) is its first key's ``[0]`` for tuple keys.
    ``uses`` (optional, parallel to ``trace``): per step, (tokens in the step, tokens per key).
    ``probs`` (optional, parallel): per step, the router's probability for each of the layer's experts.
    """
    c = ExpertCache(budget_bytes=capacity, policy=policy, policy_opts=policy_opts)
    for i, step in enumerate(trace):
        n, per_key = uses[i] if uses is not None else (1, [1] * len(step))
        if step:
            k0 = step[0]
            c.step(k0[0] if isinstance(k0, tuple) else None, n, probs[i] if probs is not None else None)
        for k, u in zip(step, per_key, strict=True):
            if c.lookup(k, u) is None:
                c.insert(k, None, 1, pinned=step)
    return c.stats


def belady_hits(trace: Sequence[Sequence[Key]], capacity: int) -> CacheStats:
    """Optimal offline hit count (Belady's MIN) for unit-size items on the same step trace."""
    flat = [k for step in trace for k in step]
    step_of = [i for i, step in enumerate(trace) for _ in step]
    inf = len(flat) + 1
    nxt = [inf] * len(flat)
    last: dict[Key, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        nxt[i] = last.get(flat[i], inf)
        last[flat[i]] = i
    stats = CacheStats()
    resident: dict[Key, int] = {}  # key -> next use position
    heap: list[tuple[int, Key]] = []  # max-heap on next use (negated)
    for i, k in enumerate(flat):
        if k in resident:
            stats.hits += 1
        else:
            stats.misses += 1
            if capacity <= 0:
                continue
            if len(resident) >= capacity:
                # evict farthest next use, but never a key of the current step (pinned)
                pinned = set(trace[step_of[i]])
                skipped = []
                while heap:
                    negn, v = heapq.heappop(heap)
                    if resident.get(v) != -negn:
                        continue
                    if v in pinned:
                        skipped.append((negn, v))
                        continue
                    if -negn < nxt[i]:
                        # every resident key is needed sooner than k: bypass (don't cache k)
                        skipped.append((negn, v))
                        v = None
                    break
                else:
                    v = None
                for item in skipped:
                    heapq.heappush(heap, item)
                if v is None:
                    continue
                del resident[v]
                stats.evictions += 1
        resident[k] = nxt[i]
        heapq.heappush(heap, (-nxt[i], k))
    return stats
