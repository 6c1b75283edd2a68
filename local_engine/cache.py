"""Byte-bounded expert cache with pluggable eviction and hit/miss stats.

Offline replays of recorded traces and Belady's optimum live with the benchmarks
(benchmarks/cache_research.py).

Keys are ``(layer, expert)``; values are opaque buffers with a byte size. The budget counts
only those buffers (what we hold in anonymous memory), never the page cache.

Policies
- ``lru``: evict the least recently used bundle.
- ``lfu-da``: LFU with dynamic aging (Arlitt et al. 2000). Priority = L + hits; evicting
  sets L to the victim's priority, so stale-but-once-hot experts age out. MoE routers have
  persistent per-expert popularity that LRU forgets each time a layer's working set rolls
  over; LFU-DA keeps the popular ones. O(log n) per operation via a lazy heap.
- ``tinylfu``: LRU order plus frequency *admission* (Einziger et al., TinyLFU): a missed
  expert only displaces the LRU victim if it has been requested more often (counts include
  misses and are halved every ``10 x capacity`` accesses so popularity can drift). When the
  cache holds less than one sweep of all layers (small budgets), admit-everything policies
  thrash to ~0 hits; admission keeps a stable popular set, which is what Belady does.
- ``layer-lfu``: the bundles most likely to be routed at their layer's next step, by
  an exponentially decayed count of uses per expert on its own layer's clock (prefill token
  counts included), with admission. See ``_LayerLFU``.
- ``adaptive`` (default): ``layer-lfu`` with the decay chosen online among a few candidates by shadow
  caches (short memory for sticky routing, long memory for stable favourites).
- ``router-lfu``: scores from the router's softmax over ALL of a layer's experts (passed with
  ``ExpertCache.step(..., probs=...)``, one vector per layer step), e.g. the calibrated chance of
  being in the layer's next top-k. See ``_RouterLFU``.
- ``router``: ``adaptive``'s choice by shadow caches over ``adaptive``'s three candidates plus two
  router-driven ones (``ROUTER_CANDIDATES``). Better than ``adaptive`` where routing drifts slowly
  (synthetic router traces: +0.01 to +0.06 of Belady), equal on the random-router checkpoint (no
  temporal signal to exploit); about twice its bookkeeping (~10-15 ms per token of 24 x 64 experts).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Key = Hashable
POLICIES = ("lru", "lfu-da", "tinylfu", "layer-lfu", "adaptive", "router-lfu", "router")
ROUTER_AWARE_POLICIES = ("router-lfu", "router")  # the ones whose `observe` reads router probabilities
DEFAULT_POLICY = "adaptive"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    inserts: int = 0
    rejected: int = 0  # items that did not fit at all (budget smaller than one item)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "inserts": self.inserts, "hit_rate": self.hit_rate}


class _Policy:
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


class _LRU(_Policy):
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


class _LFUDA(_Policy):
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


class _TinyLFU(_LRU):
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


class _LayerLFU(_Policy):
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


class _AdaptiveLayerLFU(_Policy):
    """layer-LFU whose decay follows whichever of a few candidates has been hitting most lately.

    How fast popularity should be forgotten depends on the routing: a router with stable
    favourites wants a long memory (decay near 1), one with token-to-token reuse wants a short one.
    Each candidate decay runs a shadow cache (keys only, same capacity in bundles) fed the same
    requests; the real cache takes its eviction and admission decisions from the candidate whose
    shadow has the most hits, counted with exponential forgetting over a few tokens' requests.
    Cost: a few dict/heap operations per candidate per request, negligible next to a bundle read.
    """

    def __init__(self, capacity: int, decays: Sequence[float] = (0.5, 0.8, 0.95), window: int = 1000,
                 candidates: Sequence[Callable[[], _Policy]] | None = None) -> None:
        self._cap = max(int(capacity), 0)
        make = list(candidates) if candidates is not None else [lambda d=d: _LayerLFU(d) for d in decays]
        self._real = [m() for m in make]  # scores (+ heaps) over the real cache's keys
        # scores (+ heaps) over each shadow's keys; shared with the real one where the policy allows
        self._shadow = [r.twin() if isinstance(r, _RouterLFU) else m() for r, m in zip(self._real, make, strict=True)]
        self._sets: list[set[Key]] = [set() for _ in make]
        self._hits = [0.0] * len(make)
        self._fade = 1.0 - 1.0 / max(window, 1)
        self.leader = len(make) - 1
        self._pinned: set[Key] = set()
        # each shadow's misses of the current step, inserted when the step ends, as the runtime does
        # (all of a step's lookups first, then its inserts with every key of the step pinned); without
        # it a shadow could evict a key of the step it has not seen yet, which the real cache never does
        self._missed: list[list[Key]] = [[] for _ in make]
        self._stepped = False

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        self._flush()
        self._stepped = True
        for p in (*self._real, *self._shadow):
            p.step(group, n_tokens)
        self._pinned = set()

    def observe(self, group: Hashable, probs: Sequence[float]) -> None:
        for p in (*self._real, *self._shadow):
            p.observe(group, probs)

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
        if not self._stepped:  # used without steps: every request is its own step
            self._flush()
            self._pinned = set()
        best = max(range(len(self._hits)), key=self._hits.__getitem__)
        if self._hits[best] > self._hits[self.leader]:
            self.leader = best

    def admit(self, key: Key, victim: Key) -> bool:
        return self._real[self.leader].admit(key, victim)

    def insert(self, key: Key) -> None:
        for p in self._real:
            p.insert(key)

    def remove(self, key: Key) -> None:
        for p in self._real:
            p.remove(key)

    def victim(self, pinned: set[Key]) -> Key | None:
        return self._real[self.leader].victim(pinned)


class _RouterScores:
    """The scores of one ``_RouterLFU`` configuration: they depend only on the requests and the
    router's probabilities, never on what is cached, so ``adaptive``'s real cache and its shadow
    share them (``_RouterLFU.twin``). ``ver[g]`` changes whenever a score of group g may have moved."""

    def __init__(self, decay: float, used: float, mean_prob: float, now_prob: float, logit: float,
                 logit_now: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        if not 0.0 <= logit_now <= 1.0:
            raise ValueError("logit_now must be in [0, 1]")
        self.d, self.a, self.b, self.c = decay, used, mean_prob, now_prob
        self.lw, self.lam = logit, logit_now
        self.ids: dict[Key, int] = {}  # index of a key that is not (layer, int)
        self.used: dict[Hashable, list[float]] = {}  # group -> decayed selections per expert
        self.mp: dict[Hashable, list[float]] = {}  # group -> decayed probabilities per expert
        self.now: dict[Hashable, list[float]] = {}  # group -> this step's probabilities
        self.lmean: dict[Hashable, list[float]] = {}  # group -> decayed sum of centred log-probabilities
        self.lwt: dict[Hashable, float] = {}  # group -> decayed sum of weights (for the mean)
        self.lsc: dict[Hashable, list[float]] = {}  # group -> P(in the next top-k) per expert
        self.tot: dict[Hashable, list[float]] = {}  # group -> score per expert
        self.w: dict[Hashable, float] = {}  # weight of the group's current step: n tokens = n steps
        self.n: dict[Hashable, int] = {}
        self.k = 1.0  # experts per token, learned: sum of uses / tokens over the last step
        self.step_uses = 0
        self.step_tokens = 0
        self.ver: dict[Hashable, int] = {}
        self.kver = 0  # bumped when k changes (every score has a k term)

    def split(self, key: Key) -> tuple[Hashable, int]:
        if type(key) is tuple and len(key) == 2 and type(key[1]) is int and key[1] >= 0:
            return key[0], key[1]
        return None, self.ids.setdefault(key, len(self.ids))

    @staticmethod
    def _grow(lst: list[float], n: int) -> list[float]:
        if len(lst) < n:
            lst.extend([0.0] * (n - len(lst)))
        return lst

    def _retotal(self, g: Hashable) -> None:
        u = self._grow(self.used.setdefault(g, []), max(len(self.mp.get(g, ())), len(self.now.get(g, ()))))
        n = len(u)
        a, kb, kc = self.a, self.k * self.b, self.k * self.c
        tot = [a * x for x in u]
        for coef, src in ((kb, self.mp.get(g)), (kc, self.now.get(g)), (self.lw, self.lsc.get(g))):
            if coef and src:
                tot = [t + coef * x for t, x in zip(tot, self._grow(src, n), strict=False)]
        self.tot[g] = tot
        self.ver[g] = self.ver.get(g, 0) + 1

    def _logit_scores(self, g: Hashable, probs: Sequence[float]) -> None:
        """P(expert in the layer's next top-k), from the router's log-probabilities: the next logit is
        predicted as ``logit_now`` x this step's + the rest x its decayed mean (a slowly drifting
        hidden state pulls towards the expert's usual score), and an expert is in if its prediction
        clears the k-th best of the layer: score = sigmoid(prediction - threshold). Comparable
        across layers (a probability), unlike raw router probabilities (flat vs peaked layers)."""
        lp = [math.log(max(p, 1e-12)) for p in probs]
        c = sum(lp) / len(lp)
        lp = [x - c for x in lp]  # logits up to a constant: centre them
        f, w = self.d ** self.n.get(g, 1), self.w.get(g, 1.0)
        m = self.lmean.get(g)
        m = [w * x for x in lp] if m is None or len(m) != len(lp) else [f * y + w * x for y, x in zip(m, lp, strict=True)]
        self.lmean[g] = m
        wt = self.lwt[g] = self.lwt.get(g, 0.0) * f + w
        lam, rest = self.lam, (1.0 - self.lam) / wt
        mu = [lam * x + rest * y for x, y in zip(lp, m, strict=True)]
        k = min(max(round(self.k), 1), len(mu) - 1) if len(mu) > 1 else 0
        srt = sorted(mu, reverse=True)
        tau = 0.5 * (srt[k - 1] + srt[k]) if k else srt[0]
        self.lsc[g] = [1.0 / (1.0 + math.exp(min(tau - x, 700.0))) for x in mu]

    def step(self, group: Hashable, n_tokens: int) -> None:
        if self.step_tokens and self.step_uses and self.step_uses / self.step_tokens != self.k:
            self.k = self.step_uses / self.step_tokens
            self.kver += 1
            for g in list(self.tot):
                if g != group:
                    self._retotal(g)
        n = max(n_tokens, 1)
        d = self.d
        self.n[group] = n
        self.w[group] = float(n) if d == 1.0 else (1.0 - d**n) / (1.0 - d)
        self.step_uses, self.step_tokens = 0, n
        f = d**n
        if group in self.used:
            self.used[group] = [x * f for x in self.used[group]]
        if group in self.mp:
            self.mp[group] = [x * f for x in self.mp[group]]
        self.now.pop(group, None)
        self._retotal(group)

    def observe(self, group: Hashable, probs: Sequence[float]) -> None:
        if not probs:
            return
        if self.b:
            w = self.w.get(group, 1.0)
            mp = self._grow(self.mp.get(group, []), len(probs))
            self.mp[group] = [x + w * p for x, p in zip(mp, probs, strict=False)] + mp[len(probs):]
        self.now[group] = list(probs)
        if self.lw:
            self._logit_scores(group, probs)
        self._retotal(group)

    def access(self, key: Key, uses: int) -> None:
        g, e = self.split(key)
        self.step_uses += uses
        add = uses / self.n.get(g, 1) * self.w.get(g, 1.0)
        self._grow(self.used.setdefault(g, []), e + 1)[e] += add
        self._grow(self.tot.setdefault(g, []), e + 1)[e] += self.a * add
        self.ver[g] = self.ver.get(g, 0) + 1

    def score(self, g: Hashable, e: int) -> float:
        t = self.tot.get(g)
        return t[e] if t is not None and e < len(t) else 0.0


class _RouterLFU(_Policy):
    """Keep the experts with the highest predicted use at their layer's next steps, from the router.

    The MoE layer computes the router's softmax over ALL its experts for every token; only the
    top-k are used, but an expert that scored high and just missed the cut is a likely pick of the
    next tokens when hidden states drift slowly, and the probabilities of all E experts estimate
    each expert's popularity from E numbers per token instead of k selections. The score, per
    expert, on its own layer's clock (see ``_LayerLFU`` for why per layer):

        score = used * EMA(selected) + k * (mean_prob * EMA(p) + now_prob * p_now) + logit * P(next top-k)

    EMA: decayed sum with ``decay`` per step of the layer (a micro-batch of n tokens counts as n
    steps), p: the router's probability (mean over the step's tokens), scaled by k (experts per
    token, learned from the steps: uses / tokens) so it counts like a selection (both sum to k
    over a layer's experts). P(next top-k): see ``_RouterScores._logit_scores``. ``used`` alone is
    ``_LayerLFU``'s score. Victim: the lowest score over all layers; admission: a miss enters only
    if it out-scores the victim.

    Scores live in per-layer lists indexed by expert and only move at their layer's steps, so each
    layer's minimum is cached until that layer changes. Cost: O(E) per layer step, O(layers) per
    victim plus a scan of the current layer's cached experts. Keys that are not ``(layer, int)``
    (tests, other users) share one group and get no router term.
    """

    def __init__(self, decay: float = 0.8, used: float = 1.0, mean_prob: float = 0.0, now_prob: float = 0.0,
                 logit: float = 0.0, logit_now: float = 0.5, scores: _RouterScores | None = None) -> None:
        self._own = scores is None  # a twin reads its scores, the owner updates them
        self.s = scores or _RouterScores(decay, used, mean_prob, now_prob, logit, logit_now)
        self._in: dict[Hashable, dict[int, Key]] = {}  # cached keys per group, by expert index
        # cached minimum per group: (score version, k version, score, expert)
        self._min: dict[Hashable, tuple[int, int, float, int]] = {}
        self._pin: tuple[int, int, set[Hashable]] = (0, -1, set())  # (id, len, groups) of the last pinned set

    def twin(self) -> _RouterLFU:
        """Another cache's view over the same scores (same requests, other contents)."""
        return _RouterLFU(scores=self.s)

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        if self._own:
            self.s.step(group, n_tokens)

    def observe(self, group: Hashable, probs: Sequence[float]) -> None:
        if self._own:
            self.s.observe(group, probs)

    def access(self, key: Key, uses: int = 1) -> None:
        if self._own:
            self.s.access(key, uses)

    def score(self, key: Key) -> float:
        return self.s.score(*self.s.split(key))

    def admit(self, key: Key, victim: Key) -> bool:
        return self.score(key) > self.score(victim)

    def insert(self, key: Key) -> None:
        g, e = self.s.split(key)
        self._in.setdefault(g, {})[e] = key
        m = self._min.get(g)
        if m is not None:
            sc = self.s.score(g, e)
            if sc < m[2]:
                self._min[g] = (m[0], m[1], sc, e)

    def remove(self, key: Key) -> None:
        g, e = self.s.split(key)
        self._in.get(g, {}).pop(e, None)
        m = self._min.get(g)
        if m is not None and m[3] == e:
            del self._min[g]

    def _pinned_groups(self, pinned: set[Key]) -> set[Hashable]:
        if not pinned:
            return set()
        pid, plen, groups = self._pin
        if pid != id(pinned) or plen != len(pinned):
            groups = {self.s.split(k)[0] for k in pinned}
            self._pin = (id(pinned), len(pinned), groups)
        return groups

    def victim(self, pinned: set[Key]) -> Key | None:
        s = self.s
        pg = self._pinned_groups(pinned)
        best_sc, best_e, best_g = math.inf, -1, None
        for g, cached in self._in.items():
            if not cached:
                continue
            t = s.tot.get(g) or []
            nt = len(t)
            if g in pg:  # scan, skipping this step's keys (only the current layer)
                for e, k in cached.items():
                    if k not in pinned:
                        sc = t[e] if e < nt else 0.0
                        if sc < best_sc or best_e < 0:
                            best_sc, best_e, best_g = sc, e, g
                continue
            m = self._min.get(g)
            v = s.ver.get(g, 0)
            if m is None or m[0] != v or m[1] != s.kver:
                sc, e = min((t[e] if e < nt else 0.0, e) for e in cached)
                m = self._min[g] = (v, s.kver, sc, e)
            if m[2] < best_sc or best_e < 0:
                best_sc, best_e, best_g = m[2], m[3], g
        return None if best_e < 0 else self._in[best_g][best_e]


# ``router``'s candidates: selections only with a short, mid and long memory (``adaptive``'s), and the
# calibrated next-top-k probability from the router's log-probabilities with a long-memory mean and
# little (0.3) or much (0.9) weight on the current token (stable favourites vs sticky routing). The
# last one leads until another proves better: as ``adaptive``, long-memory frequency.
ROUTER_CANDIDATES: tuple[dict[str, float], ...] = (
    {"decay": 0.5},
    {"decay": 0.8},
    {"decay": 0.98, "used": 0.0, "logit": 1.0, "logit_now": 0.3},
    {"decay": 0.98, "used": 0.0, "logit": 1.0, "logit_now": 0.9},
    {"decay": 0.95},
)


def make_policy(name: str, **opts: Any) -> _Policy:
    if name == "lru":
        return _LRU()
    if name == "tinylfu":
        return _TinyLFU()
    if name == "lfu-da":
        return _LFUDA()
    if name == "layer-lfu":
        return _LayerLFU(**opts)
    if name == "adaptive":
        return _AdaptiveLayerLFU(**opts)
    if name == "router-lfu":
        return _RouterLFU(**opts)
    if name == "router":
        cands = opts.pop("candidates", ROUTER_CANDIDATES)
        return _AdaptiveLayerLFU(candidates=[functools.partial(_RouterLFU, **c) for c in cands], **opts)
    raise ValueError(f"unknown cache policy {name!r} (choose from {', '.join(POLICIES)})")


@dataclass
class ExpertCache:
    """Holds expert buffers up to ``budget_bytes``; ``pinned`` keys (in use this step) never leave."""

    budget_bytes: int
    policy: str = "lru"
    stats: CacheStats = field(default_factory=CacheStats)
    on_evict: Callable[[Key, Any], None] | None = None  # e.g. return the buffer to a pool

    item_bytes: int = 1  # typical item size: sets TinyLFU's aging window (10 x capacity in items)
    policy_opts: dict[str, Any] = field(default_factory=dict)  # e.g. {"decay": 0.9} for layer-lfu

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError("cache budget must be >= 0")
        opts = dict(self.policy_opts)
        if self.policy in ("adaptive", "router"):
            opts.setdefault("capacity", self.budget_bytes // max(self.item_bytes, 1))
        self._pol = make_policy(self.policy, **opts)
        if isinstance(self._pol, _TinyLFU):
            self._pol.sample = max(10 * (self.budget_bytes // max(self.item_bytes, 1)), 100)
        self._items: dict[Key, tuple[Any, int]] = {}
        self.used_bytes = 0

    def step(self, group: Hashable, n_tokens: int = 1, probs: Sequence[float] | None = None) -> None:
        """Announce a new step of ``group`` (a layer) over ``n_tokens`` tokens before its lookups;
        ``probs``: the router's probability for each of the layer's experts (mean over the tokens)."""
        self._pol.step(group, n_tokens)
        if probs is not None:
            self._pol.observe(group, probs)

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, key: Key, uses: int = 1) -> Any | None:
        """Return the cached buffer (a hit, counted) or None (a miss, counted).

        ``uses``: how many of the step's tokens need it (prefill), evidence for frequency policies.
        """
        self._pol.access(key, uses)
        item = self._items.get(key)
        if item is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._pol.touch(key)
        return item[0]

    def insert(self, key: Key, value: Any, nbytes: int, pinned: Iterable[Key] = ()) -> bool:
        """Admit ``value``, evicting unpinned items as needed. False if it cannot fit."""
        if key in self._items:
            return True
        if nbytes > self.budget_bytes:
            self.stats.rejected += 1
            return False
        pin = set(pinned)
        if self.used_bytes + nbytes > self.budget_bytes:
            v = self._pol.victim(pin)
            if v is None or not self._pol.admit(key, v):
                self.stats.rejected += 1
                return False
        while self.used_bytes + nbytes > self.budget_bytes:
            v = self._pol.victim(pin)
            if v is None:
                self.stats.rejected += 1
                return False
            self._evict(v)
        self._items[key] = (value, nbytes)
        self.used_bytes += nbytes
        self._pol.insert(key)
        self.stats.inserts += 1
        return True

    def _evict(self, key: Key) -> None:
        value, n = self._items.pop(key)
        self._pol.remove(key)
        self.used_bytes -= n
        self.stats.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key, value)

    def clear(self) -> None:
        for k in list(self._items):
            self._evict(k)
