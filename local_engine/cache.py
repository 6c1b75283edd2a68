"""Byte-bounded expert cache with pluggable eviction, hit/miss stats, and offline trace replay.

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
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Key = Hashable
POLICIES = ("lru", "lfu-da", "tinylfu", "layer-lfu", "adaptive", "router-lfu", "router")
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
            h = self._heaps[g]
            heapq.heappush(h, (self._score[key], next(self._seq), key))
            if len(h) > 4 * 64 + 64:  # drop stale entries (all hits, no evictions)
                self._heaps[g] = h = [e for e in h if e[2] in self._in and self._score[e[2]] == e[0]]
                heapq.heapify(h)

    def admit(self, key: Key, victim: Key) -> bool:
        return self._now(key) > self._now(victim)

    def insert(self, key: Key) -> None:
        self._in.add(key)
        heapq.heappush(self._heaps.setdefault(self._group(key), []),
                       (self._score.get(key, 0.0), next(self._seq), key))

    def remove(self, key: Key) -> None:
        self._in.discard(key)

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
        for g, h in self._heaps.items():
            k = self._top(h, pinned)
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
        self._shadow = [m() for m in make]  # scores (+ heaps) over each shadow's keys
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


class _RouterLFU(_Policy):
    """Keep the experts with the highest predicted use at their layer's next steps, from the router.

    The MoE layer computes the router's softmax over ALL its experts for every token; only the
    top-k are used, but an expert that scored high and just missed the cut is a likely pick of the
    next tokens when hidden states drift slowly, and the probabilities of all E experts estimate
    each expert's popularity from E numbers per token instead of k selections. The score, per
    expert, on its own layer's clock (see ``_LayerLFU`` for why per layer):

        score = used * EMA(selected) + k * (mean_prob * EMA(p) + now_prob * p_now)

    EMA: decayed sum with ``decay`` per step of the layer (a micro-batch of n tokens counts as n
    steps), p: the router's probability (mean over the step's tokens), scaled by k (experts per
    token, learned from the steps: uses / tokens) so it counts like a selection (both sum to k
    over a layer's experts). ``used`` alone is ``_LayerLFU``'s score. Victim: the lowest score over
    all layers; admission: a miss enters only if it out-scores the victim.

    Scores live in per-layer lists indexed by expert and only move at their layer's steps, so each
    layer's minimum is cached until that layer changes. Cost: O(E) per layer step, O(layers) per
    victim plus a scan of the current layer's cached experts: microseconds next to a bundle read.
    Keys that are not ``(layer, int)`` (tests, other users) share one group and get no router term.
    """

    def __init__(self, decay: float = 0.8, used: float = 1.0, mean_prob: float = 0.0, now_prob: float = 0.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        self._d, self._a, self._b, self._c = decay, used, mean_prob, now_prob
        self._ids: dict[Key, int] = {}  # index of a key that is not (layer, int)
        self._used: dict[Hashable, list[float]] = {}  # group -> decayed selections per expert
        self._mp: dict[Hashable, list[float]] = {}  # group -> decayed probabilities per expert
        self._now: dict[Hashable, list[float]] = {}  # group -> this step's probabilities
        self._tot: dict[Hashable, list[float]] = {}  # group -> score per expert
        self._w: dict[Hashable, float] = {}  # weight of the group's current step (see _geo)
        self._n: dict[Hashable, int] = {}
        self._k = 1.0  # experts per token, learned: sum of uses / tokens over the last step
        self._step_uses = 0
        self._step_tokens = 0
        self._in: dict[Hashable, dict[int, Key]] = {}  # cached keys per group, by expert index
        self._min: dict[Hashable, tuple[float, int] | None] = {}  # cached minimum per group (None: stale)

    def _split(self, key: Key) -> tuple[Hashable, int]:
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], int) and key[1] >= 0:
            return key[0], key[1]
        return None, self._ids.setdefault(key, len(self._ids))

    @staticmethod
    def _grow(lst: list[float], n: int) -> list[float]:
        if len(lst) < n:
            lst.extend([0.0] * (n - len(lst)))
        return lst

    def _retotal(self, g: Hashable) -> None:
        u = self._used.get(g, [])
        mp, now = self._mp.get(g), self._now.get(g)
        a, kb, kc = self._a, self._k * self._b, self._k * self._c
        n = max(len(u), len(mp or ()), len(now or ()))
        u = self._grow(u, n)
        self._used[g] = u
        if mp is None or kb == 0.0:
            mp = [0.0] * n
        if now is None or kc == 0.0:
            now = [0.0] * n
        self._tot[g] = [a * x + kb * y + kc * z for x, y, z in zip(u, self._grow(mp, n), self._grow(now, n), strict=True)]
        self._min[g] = None

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        k_changed = False
        if self._step_tokens and self._step_uses and self._step_uses / self._step_tokens != self._k:
            self._k = self._step_uses / self._step_tokens
            k_changed = True
        n = max(n_tokens, 1)
        d = self._d
        self._n[group] = n
        self._w[group] = float(n) if d == 1.0 else (1.0 - d**n) / (1.0 - d)
        self._step_uses, self._step_tokens = 0, n
        f = d**n
        if group in self._used:
            self._used[group] = [x * f for x in self._used[group]]
        if group in self._mp:
            self._mp[group] = [x * f for x in self._mp[group]]
        self._now.pop(group, None)
        if k_changed:  # every score has a k term: recompute all
            for g in list(self._tot):
                if g != group:
                    self._retotal(g)
        self._retotal(group)

    def observe(self, group: Hashable, probs: Sequence[float]) -> None:
        w = self._w.get(group, 1.0)
        mp = self._grow(self._mp.get(group, []), len(probs))
        self._mp[group] = [x + w * p for x, p in zip(mp, probs, strict=False)] + mp[len(probs):]
        self._now[group] = list(probs)
        self._retotal(group)

    def score(self, key: Key) -> float:
        g, e = self._split(key)
        t = self._tot.get(g)
        return t[e] if t is not None and e < len(t) else 0.0

    def access(self, key: Key, uses: int = 1) -> None:
        g, e = self._split(key)
        self._step_uses += uses
        add = uses / self._n.get(g, 1) * self._w.get(g, 1.0)
        u = self._grow(self._used.setdefault(g, []), e + 1)
        u[e] += add
        t = self._grow(self._tot.setdefault(g, []), e + 1)
        t[e] += self._a * add
        if e in self._in.get(g, ()):
            self._min[g] = None

    def admit(self, key: Key, victim: Key) -> bool:
        return self.score(key) > self.score(victim)

    def insert(self, key: Key) -> None:
        g, e = self._split(key)
        self._in.setdefault(g, {})[e] = key
        m = self._min.get(g)
        if m is not None:
            s = self.score(key)
            if s < m[0]:
                self._min[g] = (s, e)

    def remove(self, key: Key) -> None:
        g, e = self._split(key)
        self._in.get(g, {}).pop(e, None)
        m = self._min.get(g)
        if m is not None and m[1] == e:
            self._min[g] = None

    def victim(self, pinned: set[Key]) -> Key | None:
        pinned_groups = {self._split(k)[0] for k in pinned} if pinned else set()
        best: tuple[float, int] | None = None
        best_g: Hashable = None
        for g, cached in self._in.items():
            if not cached:
                continue
            t = self._tot.get(g) or []
            if g in pinned_groups:  # scan, skipping this step's keys (rare: only the current layer)
                m = min(((t[e] if e < len(t) else 0.0, e) for e, k in cached.items() if k not in pinned),
                        default=None)
            else:
                m = self._min.get(g)
                if m is None:
                    m = self._min[g] = min((t[e] if e < len(t) else 0.0, e) for e in cached)
            if m is not None and (best is None or m[0] < best[0]):
                best, best_g = m, g
        return None if best is None else self._in[best_g][best[1]]


# router-aware candidates for ``router``: selections only (short, mid, long memory, i.e. ``adaptive``'s),
# popularity from the router's probabilities, and the current token's probabilities (sticky routing)
ROUTER_CANDIDATES: tuple[dict[str, float], ...] = (
    {"decay": 0.5},
    {"decay": 0.95},
    {"decay": 0.8, "used": 0.0, "mean_prob": 1.0, "now_prob": 1.0},
    {"decay": 0.95, "used": 1.0, "now_prob": 3.0},
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
        return _AdaptiveLayerLFU(candidates=[lambda c=c: _RouterLFU(**c) for c in cands], **opts)
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


# --------------------------------------------------------------------------- offline replay

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
