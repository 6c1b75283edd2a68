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
from collections.abc import Set as AbstractSet

Key = Hashable


class Policy:
    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        """A new step of ``group`` (a layer) over ``n_tokens`` tokens: its keys come next."""

    def observe(self, group: Hashable, probs: Sequence[float]) -> None:
        """The router's probabilities over all of ``group``'s experts at this step (after ``step``)."""

    def access(self, key: Key, uses: int = 1) -> None:
        """Every request (hit or miss), before touch/insert; ``uses``: tokens routed to it."""

    def access_many(self, keys: Sequence[Key], uses: Sequence[int]) -> None:
        """``access`` for each of a step's keys in order, all before any of their touches (no
        policy's touch reads what access writes). One call a step instead of one a key."""
        for key, u in zip(keys, uses, strict=True):
            self.access(key, u)

    def admit(self, key: Key, victim: Key) -> bool:
        return True

    def twin(self) -> Policy | None:
        """Another cache's view over the same scores (same requests, other contents), or None where
        the policy's scores depend on what it holds (then each cache needs a policy of its own)."""
        return None

    def touch(self, key: Key) -> None: ...
    def insert(self, key: Key) -> None: ...
    def remove(self, key: Key) -> None: ...
    def victim(self, pinned: AbstractSet[Key]) -> Key | None: ...


class LRU(Policy):
    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def insert(self, key: Key) -> None:
        self._order[key] = None

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, pinned: AbstractSet[Key]) -> Key | None:
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

    def victim(self, pinned: AbstractSet[Key]) -> Key | None:
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


class LayerScores:
    """The scores of one ``LayerLFU`` decay: they depend only on the steps and uses, never on what
    is cached, so ``adaptive``'s real cache and its shadow share them (``LayerLFU.twin``) and each
    use is scored once. Scores are stored un-decayed (see ``LayerLFU``)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        self.decay = decay
        self.inv = 1.0 / decay
        self.n: dict[Hashable, int] = {}  # tokens in the group's current step
        self.unit: dict[Hashable, float] = {}  # decay ** -t for each group (layer)
        self.score: dict[Key, float] = {}  # survives eviction: popularity belongs to the expert
        self.holders: list[set[Key]] = []  # the cached keys of each LayerLFU reading these scores
        self.epoch = 0  # rescales so far: each reader rebuilds its heaps after one

    def step(self, group: Hashable, n_tokens: int) -> None:
        n = max(n_tokens, 1)
        self.n[group] = n
        u = self.unit.get(group, 1.0) * self.inv**n
        self.unit[group] = u
        if u > 1e200:
            self._rescale(1e-200)

    def _rescale(self, f: float) -> None:
        for g, u in self.unit.items():
            self.unit[g] = u * f
        # a score too small to matter goes, unless a reader holds its key (its heaps need it)
        kept = {k: v * f for k, v in self.score.items() if v * f > 1e-250 or any(k in h for h in self.holders)}
        self.score.clear()
        self.score.update(kept)
        self.epoch += 1


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

    A victim is found without visiting every layer: each layer's lowest live key sits, with its
    decayed score, in one heap over layers (``_lows``, stale entries skipped by version) and is only
    recomputed after that layer changed (``_dirty``: a step, a cached key's use, an insert, a
    removal). The step's own layer, whose keys are pinned, is searched on its own. At a 5% budget
    the victim is asked ~600 times a token (the real cache and ``adaptive``'s shadows), and a
    walk over all 24 layers each time cost several ms a token.
    """

    def __init__(self, decay: float = 0.9, scores: LayerScores | None = None) -> None:
        self._own = scores is None  # a twin reads its scores, the owner updates them
        self._s = scores or LayerScores(decay)
        self._decay = self._s.decay
        self._in: set[Key] = set()
        self._s.holders.append(self._in)
        # the shared state's dicts, mutated in place only, so these stay the same objects
        self._n, self._unit, self._score = self._s.n, self._s.unit, self._s.score
        self._epoch = self._s.epoch  # rescales seen
        self._heaps: dict[Hashable, list[tuple[float, int, Key]]] = {}
        # each group's place in _heaps' order: equal scores in two layers go to the earlier one
        self._rank: dict[Hashable, int] = {}
        # (decayed score, rank, version, group, key) of each clean group's lowest live key
        self._lows: list[tuple[float, int, int, Hashable, Key]] = []
        self._ver: dict[Hashable, int] = {}  # an entry of _lows is live while its version is the group's
        self._dirty: set[Hashable] = set()  # groups whose entry in _lows may be out of date
        self._seq = itertools.count()
        # the last frozen pinned set and its groups (a step's inserts all pass the same one)
        self._pin: tuple[AbstractSet[Key] | None, set[Hashable]] = (None, set())

    def twin(self) -> LayerLFU:
        """Another cache's view over the same scores (``adaptive``'s shadow of this candidate)."""
        return LayerLFU(scores=self._s)

    @staticmethod
    def _group(key: Key) -> Hashable:
        return key[0] if isinstance(key, tuple) and key else None

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        if self._own:
            self._s.step(group, n_tokens)
        self._dirty.add(group)  # the same lowest key, a new decayed score
        if self._epoch != self._s.epoch:
            self._epoch = self._s.epoch
            self._rebuild()

    def _rebuild(self) -> None:
        """Heaps anew from the rescaled scores."""
        self._heaps = {}
        for k in self._in:
            self._heaps.setdefault(self._group(k), []).append((self._score[k], next(self._seq), k))
        for h in self._heaps.values():
            heapq.heapify(h)
        self._rank = {g: i for i, g in enumerate(self._heaps)}
        self._lows = []
        self._dirty = set(self._heaps)

    def _now(self, key: Key) -> float:
        """The decayed score at its layer's current time."""
        return self._score.get(key, 0.0) / self._unit.get(self._group(key), 1.0)

    def access(self, key: Key, uses: int = 1) -> None:
        self.access_many((key,), (uses,))

    def access_many(self, keys: Sequence[Key], uses: Sequence[int]) -> None:
        score, unit, ns, held, heaps = self._score, self._unit, self._n, self._in, self._heaps
        own, d = self._own, self._decay
        for key, u in zip(keys, uses, strict=True):
            g = key[0] if isinstance(key, tuple) and key else None
            if own:
                n = ns.get(g, 1)
                w = 1.0
                if n > 1:  # a prefill micro-batch of n tokens: as n decode steps with the expert in uses/n of them
                    w = u / n * (n if d == 1.0 else (1.0 - d**n) / (1.0 - d))
                score[key] = score.get(key, 0.0) + w * unit.get(g, 1.0)
            if key in held:
                self._dirty.add(g)
                h = heaps[g]
                heapq.heappush(h, (score[key], next(self._seq), key))
                if len(h) > 4 * 64 + 64:  # drop stale entries (all hits, no evictions)
                    heaps[g] = h = [e for e in h if e[2] in held and score[e[2]] == e[0]]
                    heapq.heapify(h)

    def admit(self, key: Key, victim: Key) -> bool:
        # _now(key) > _now(victim), inlined: asked for every miss of the real cache and each shadow
        score, unit = self._score, self._unit
        gk = key[0] if isinstance(key, tuple) and key else None
        gv = victim[0] if isinstance(victim, tuple) and victim else None
        return score.get(key, 0.0) / unit.get(gk, 1.0) > score.get(victim, 0.0) / unit.get(gv, 1.0)

    def insert(self, key: Key) -> None:
        self._in.add(key)
        g = self._group(key)
        self._dirty.add(g)
        h = self._heaps.get(g)
        if h is None:
            self._rank[g] = len(self._heaps)
            h = self._heaps[g] = []
        heapq.heappush(h, (self._score.get(key, 0.0), next(self._seq), key))

    def remove(self, key: Key) -> None:
        self._in.discard(key)
        self._dirty.add(self._group(key))

    def _top(self, h: list[tuple[float, int, Key]], pinned: AbstractSet[Key]) -> Key | None:
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

    def _refresh(self, g: Hashable) -> None:
        """Put group ``g``'s lowest live key, unpinned, in ``_lows`` (its older entry goes stale)."""
        h = self._heaps.get(g)
        if h is None:
            return
        v = self._ver[g] = self._ver.get(g, 0) + 1
        k = self._top(h, _NONE)
        if k is not None:
            heapq.heappush(self._lows, (self._score[k] / self._unit.get(g, 1.0), self._rank[g], v, g, k))
            if len(self._lows) > 4 * len(self._heaps) + 64:
                self._lows = [e for e in self._lows if self._ver[e[3]] == e[2]]
                heapq.heapify(self._lows)

    def victim(self, pinned: AbstractSet[Key]) -> Key | None:
        # the lowest decayed score over all layers, the earlier layer on a tie
        if pinned is self._pin[0]:
            pg = self._pin[1]
        else:
            pg = {k[0] if isinstance(k, tuple) and k else None for k in pinned}
            if isinstance(pinned, frozenset):  # immutable, and held here: the same object, the same groups
                self._pin = (pinned, pg)
        dirty = self._dirty
        if dirty:
            # the step's own layers stay dirty: their pinned keys are skipped below, not remembered
            for g in dirty - pg if pg else dirty:
                self._refresh(g)
            self._dirty = dirty & pg
        best: tuple[float, int, Key] | None = None
        for g in pg:
            h = self._heaps.get(g)
            if h is None:
                continue
            k = self._top(h, pinned)
            if k is not None:
                s, r = self._score[k] / self._unit.get(g, 1.0), self._rank[g]
                if best is None or s < best[0] or (s == best[0] and r < best[1]):
                    best = (s, r, k)
        lows, ver = self._lows, self._ver
        aside = []
        while lows:
            e = lows[0]
            if ver[e[3]] != e[2]:
                heapq.heappop(lows)
            elif e[3] in pg:
                aside.append(heapq.heappop(lows))
            else:
                if best is None or e[0] < best[0] or (e[0] == best[0] and e[1] < best[1]):
                    best = (e[0], e[1], e[4])
                break
        for e in aside:
            heapq.heappush(lows, e)
        return None if best is None else best[2]


_NONE: frozenset[Key] = frozenset()
