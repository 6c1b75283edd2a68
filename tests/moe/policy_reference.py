"""Straightforward reference versions of the expert cache's decisions, for tests/moe/test_policy_equivalence.py.

The runtime's ``LayerLFU`` keeps per-layer heaps and a heap of layer minima so a victim costs
O(log n) instead of a scan of every layer; ``AdaptiveLayerLFU`` shares scores between a candidate's
real cache and its shadow; ``ExpertCache.insert`` asks for a victim once where it used to ask twice.
None of that may change a decision. These versions make the same decisions the slow, obvious way
(scan every cached key per victim; every candidate with its own scores; the cache loop as it was),
so a replay can compare the two decision by decision.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from local_engine.adaptive_policy import AdaptiveLayerLFU
from local_engine.cache_policies import Key, Policy


def _group(key: Key) -> Hashable:
    return key[0] if isinstance(key, tuple) and key else None


class RefLayerLFU(Policy):
    """``LayerLFU``'s rule by a scan: the victim is the cached, unpinned, scored key with the lowest
    score on its layer's clock; ties go to the layer that entered the cache first (re-counted, in the
    cached set's iteration order, when scores are rescaled), then to the lower stored score, then to
    the key whose score last changed (or that entered) first."""

    def __init__(self, decay: float = 0.9) -> None:
        self._decay, self._inv = decay, 1.0 / decay
        self._n: dict[Hashable, int] = {}
        self._unit: dict[Hashable, float] = {}
        self._score: dict[Key, float] = {}
        self._in: set[Key] = set()
        self._rank: dict[Hashable, int] = {}  # layers in order of entering the cache
        self._seq: dict[Key, int] = {}  # when each cached key's score last moved
        self._count = itertools.count()

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        n = max(n_tokens, 1)
        self._n[group] = n
        self._unit[group] = u = self._unit.get(group, 1.0) * self._inv**n
        if u > 1e200:
            f = 1e-200
            self._unit = {g: x * f for g, x in self._unit.items()}
            self._score = {k: v * f for k, v in self._score.items() if v * f > 1e-250 or k in self._in}
            self._rank = {}
            for k in self._in:
                self._rank.setdefault(_group(k), len(self._rank))
                self._seq[k] = next(self._count)

    def access(self, key: Key, uses: int = 1) -> None:
        g = _group(key)
        n = self._n.get(g, 1)
        w = 1.0
        if n > 1:
            d = self._decay
            w = uses / n * (n if d == 1.0 else (1.0 - d**n) / (1.0 - d))
        self._score[key] = self._score.get(key, 0.0) + w * self._unit.get(g, 1.0)
        if key in self._in:
            self._seq[key] = next(self._count)

    def _now(self, key: Key) -> float:
        return self._score.get(key, 0.0) / self._unit.get(_group(key), 1.0)

    def admit(self, key: Key, victim: Key) -> bool:
        return self._now(key) > self._now(victim)

    def insert(self, key: Key) -> None:
        self._in.add(key)
        self._rank.setdefault(_group(key), len(self._rank))
        self._seq[key] = next(self._count)

    def remove(self, key: Key) -> None:
        self._in.discard(key)

    def victim(self, pinned: set[Key]) -> Key | None:
        live = [k for k in self._in if k not in pinned and k in self._score]
        if not live:
            return None
        return min(live, key=lambda k: (self._now(k), self._rank[_group(k)], self._score[k], self._seq[k]))


class RefAdaptive(AdaptiveLayerLFU):
    """``AdaptiveLayerLFU``'s plumbing (candidates, steps, the leader's answers) with its decisions
    made the obvious way: a victim asked per shadow miss, every request on its own, the leader as
    the first index of the most hits. Given ``RefLayerLFU`` candidates (no ``twin``), every shadow
    keeps its own scores."""

    def __init__(self, capacity: int, make: Sequence[Callable[[], Policy]]) -> None:
        super().__init__(capacity, candidates=make)

    def _flush(self) -> None:
        for p, keys, missed in zip(self._shadow, self._sets, self._missed, strict=True):
            for key in missed:
                if len(keys) >= self._cap:
                    v = p.victim(self._pinned)
                    if v is None or not p.admit(key, v):
                        continue
                    keys.discard(v)
                    p.remove(v)
                keys.add(key)
                p.insert(key)
            missed.clear()

    def access_many(self, keys: Sequence[Key], uses: Sequence[int]) -> None:
        for key, u in zip(keys, uses, strict=True):
            self.access(key, u)

    def access(self, key: Key, uses: int = 1) -> None:
        self._pinned.add(key)
        for p in self._real:
            p.access(key, uses)
        for i, (p, keys) in enumerate(zip(self._shadow, self._sets, strict=True)):
            p.access(key, uses)
            self._hits[i] *= self._fade
            if key in keys:
                self._hits[i] += 1.0
            elif self._cap > 0:
                self._missed[i].append(key)
        if not self._stepped:
            self._flush()
            self._pinned = set()
        best = max(range(len(self._hits)), key=self._hits.__getitem__)
        if self._hits[best] > self._hits[self.leader]:
            self.leader = best


class RefCache:
    """``ExpertCache``'s lookup / insert as they were: a victim asked for admission, then again per
    eviction; every decision appended to ``log``."""

    def __init__(self, budget: int, policy: Policy) -> None:
        self.budget, self.pol, self.used = budget, policy, 0
        self.items: dict[Key, int] = {}
        self.log: list[Any] = []

    def step(self, group: Hashable, n_tokens: int = 1, probs: Sequence[float] | None = None) -> None:
        self.pol.step(group, n_tokens)
        if probs is not None:
            self.pol.observe(group, probs)

    def lookup(self, key: Key, uses: int = 1) -> bool:
        self.pol.access(key, uses)
        hit = key in self.items
        if hit:
            self.pol.touch(key)
        self.log.append(("hit" if hit else "miss", key))
        return hit

    def insert(self, key: Key, nbytes: int, pinned: Iterable[Key] = ()) -> bool:
        ok = self._insert(key, nbytes, set(pinned))
        self.log.append(("in" if ok else "out", key))
        return ok

    def _insert(self, key: Key, nbytes: int, pin: set[Key]) -> bool:
        if key in self.items:
            return True
        if nbytes > self.budget:
            return False
        if self.used + nbytes > self.budget:
            v = self.pol.victim(pin)
            if v is None or not self.pol.admit(key, v):
                return False
        while self.used + nbytes > self.budget:
            v = self.pol.victim(pin)
            if v is None:
                return False
            self.used -= self.items.pop(v)
            self.pol.remove(v)
            self.log.append(("evict", v))
        self.items[key] = nbytes
        self.used += nbytes
        self.pol.insert(key)
        return True
