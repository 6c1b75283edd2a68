"""The expert cache's eviction policies on recency and frequency (``cache.make_policy`` picks one by
name; the names and what each does: ``cache.py``'s docstring). The router-driven one is
``router_policy.py``; ``adaptive``, which picks among several online, ``adaptive_policy.py``.

A policy sees every request (``access``), the cache's inserts and removals, and names the
``victim`` to evict next; ``admit`` may refuse a miss entry rather than evict a hotter bundle.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence

Key = Hashable


class Policy:
    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        """A new step of ``group`` (a layer) over ``n_tokens`` tokens: its keys come next."""

    def observe(self, group: Hashable, probs: Sequence[float]) -> None:
        """The router's probabilities over all of ``group``'s experts at this step (after ``step``)."""

    def access(self, key: Key, uses: int = 1) -> None:
        """Every request (hit or miss), before touch/insert; ``uses``: tokens routed to it."""

    def admit(self, key: Key, victim: Key) -> bool:
        return True

    def touch(self, key: Key) -> None: ...
    def insert(self, key: Key) -> None: ...
    def remove(self, key: Key) -> None: ...
    def victim(self, pinned: set[Key]) -> Key | None: ...


class LRU(Policy):
    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def insert(self, key: Key) -> None:
        self._order[key] = None

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, pinned: set[Key]) -> Key | None:
        for k in self._order:
            if k not in pinned:
                return k
        return None


class LFUDA(Policy):
    def __init__(self) -> None:
        self._age = 0.0
        self._prio: dict[Key, float] = {}
        self._freq: dict[Key, int] = {}  # survives eviction: popularity is a property of the expert
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = itertools.count()

    def _push(self, key: Key) -> None:
        p = self._age + self._freq[key]
        self._prio[key] = p
        heapq.heappush(self._heap, (p, next(self._seq), key))

    def touch(self, key: Key) -> None:
        self._freq[key] = self._freq.get(key, 0) + 1
        self._push(key)

    def insert(self, key: Key) -> None:
        self._freq[key] = self._freq.get(key, 0) + 1
        self._push(key)

    def remove(self, key: Key) -> None:
        self._prio.pop(key, None)

    def victim(self, pinned: set[Key]) -> Key | None:
        skipped = []
        found = None
        while self._heap:
            p, s, k = heapq.heappop(self._heap)
            if self._prio.get(k) != p:
                continue  # stale heap entry
            if k in pinned:
                skipped.append((p, s, k))
                continue
            found = k
            self._age = p
            break
        for item in skipped:
            heapq.heappush(self._heap, item)
        if found is not None:
            # keep the victim's live entry consistent until remove() is called
            heapq.heappush(self._heap, (self._prio[found], next(self._seq), found))
        return found


class TinyLFU(LRU):
    def __init__(self) -> None:
        super().__init__()
        self._count: dict[Key, int] = {}
        self._n = 0
        self.sample = 1000  # reset by the cache to 10 x its capacity in items

    def access(self, key: Key, uses: int = 1) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._n += 1
        if self._n >= self.sample:  # aging: halve every count
            self._n = 0
            self._count = {k: c // 2 for k, c in self._count.items() if c > 1}

    def admit(self, key: Key, victim: Key) -> bool:
        return self._count.get(key, 0) > self._count.get(victim, 0)


class LayerLFU(Policy):
    """Per-layer decayed frequency with admission: keep the experts most likely to be used next.

    A layer's experts can only be re-referenced at that layer's next step (the next token), so
    every cached bundle is "due" once per token: recency *across* layers says nothing (it is why
    LRU is a cyclic scan here and scores 0 below one sweep). What matters is the probability an
    expert is routed at its layer's next step. It is estimated by an exponentially decayed count
    of its past uses, with time counted in steps *of its own layer*:
    score = sum over uses of ``decay ** (t_layer_now - t_use)``. ``decay`` near 1 is popularity
    (LFU); near 0 it is "used at the last token". Each layer is judged on its own clock: an
    expert of a layer not yet visited for this token has not yet lost anything, so it is not
    out-ranked by an expert of a layer just visited (a global clock would do that, and evict
    experts that are needed a few steps later: the cyclic-scan trap again).

    The cache holds the highest-scoring bundles: the victim is the lowest score over all
    layers, and a miss is admitted only if its (updated) score beats the victim's, so one-shot
    experts bypass the cache instead of flushing a hot one (what Belady does).

    Scores are stored un-decayed (``sum decay ** -t_use``, one min-heap per layer), so time
    passing never touches them; the decayed score is ``stored / unit[layer]`` with
    ``unit = decay ** -t_layer``. They grow geometrically, so everything is rescaled when large.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        self._decay = decay
        self._inv = 1.0 / decay
        self._n: dict[Hashable, int] = {}  # tokens in the group's current step
        self._unit: dict[Hashable, float] = {}  # decay ** -t for each group (layer)
        self._score: dict[Key, float] = {}  # survives eviction: popularity belongs to the expert
        self._in: set[Key] = set()
        self._heaps: dict[Hashable, list[tuple[float, int, Key]]] = {}
        # each layer's lowest live key, kept until that layer's heap, scores or membership change:
        # a victim is the lowest over all layers, and re-walking every layer's heap per eviction
        # (x4 for adaptive's real cache and shadows) cost ~10 ms a token at a 5% budget
        self._low: dict[Hashable, Key | None] = {}
        self._seq = itertools.count()

    @staticmethod
    def _group(key: Key) -> Hashable:
        return key[0] if isinstance(key, tuple) and key else None

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        n = max(n_tokens, 1)
        self._n[group] = n
        u = self._unit.get(group, 1.0) * self._inv**n
        self._unit[group] = u
        if u > 1e200:
            self._rescale(1e-200)

    def _rescale(self, f: float) -> None:
        self._unit = {g: u * f for g, u in self._unit.items()}
        self._score = {k: v * f for k, v in self._score.items() if v * f > 1e-250 or k in self._in}
        self._heaps = {}
        self._low = {}
        for k in self._in:
            self._heaps.setdefault(self._group(k), []).append((self._score[k], next(self._seq), k))
        for h in self._heaps.values():
            heapq.heapify(h)

    def _now(self, key: Key) -> float:
        """The decayed score at its layer's current time."""
        return self._score.get(key, 0.0) / self._unit.get(self._group(key), 1.0)

    def access(self, key: Key, uses: int = 1) -> None:
        g = self._group(key)
        n = self._n.get(g, 1)
        w = 1.0
        if n > 1:  # a prefill micro-batch of n tokens: as n decode steps with the expert in uses/n of them
            d = self._decay
            w = uses / n * (n if d == 1.0 else (1.0 - d**n) / (1.0 - d))
        self._score[key] = self._score.get(key, 0.0) + w * self._unit.get(g, 1.0)
        if key in self._in:
            self._low.pop(g, None)
            h = self._heaps[g]
            heapq.heappush(h, (self._score[key], next(self._seq), key))
            if len(h) > 4 * 64 + 64:  # drop stale entries (all hits, no evictions)
                self._heaps[g] = h = [e for e in h if e[2] in self._in and self._score[e[2]] == e[0]]
                heapq.heapify(h)

    def admit(self, key: Key, victim: Key) -> bool:
        return self._now(key) > self._now(victim)

    def insert(self, key: Key) -> None:
        self._in.add(key)
        g = self._group(key)
        self._low.pop(g, None)
        heapq.heappush(self._heaps.setdefault(g, []), (self._score.get(key, 0.0), next(self._seq), key))

    def remove(self, key: Key) -> None:
        self._in.discard(key)
        self._low.pop(self._group(key), None)

    def _top(self, h: list[tuple[float, int, Key]], pinned: set[Key]) -> Key | None:
        """Lowest live, unpinned key of one layer's heap (stale entries dropped on the way)."""
        skipped = []
        found = None
        while h:
            s, _, k = h[0]
            if k not in self._in or self._score.get(k) != s:
                heapq.heappop(h)
                continue
            if k in pinned:
                skipped.append(heapq.heappop(h))
                continue
            found = k
            break
        for item in skipped:
            heapq.heappush(h, item)
        return found

    def victim(self, pinned: set[Key]) -> Key | None:
        best: Key | None = None
        best_s = 0.0
        pinned_groups = {self._group(k) for k in pinned}
        for g, h in self._heaps.items():
            if g in pinned_groups:  # the step's own layer: its pinned keys are skipped, not cached
                k = self._top(h, pinned)
            elif g in self._low:
                k = self._low[g]
            else:
                k = self._low[g] = self._top(h, set())
            if k is not None:
                s = self._score[k] / self._unit.get(g, 1.0)
                if best is None or s < best_s:
                    best, best_s = k, s
        return best
