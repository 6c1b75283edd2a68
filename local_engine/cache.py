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
POLICIES = ("lru", "lfu-da", "tinylfu", "layer-lfu", "adaptive")
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

    def __init__(self, capacity: int, decays: Sequence[float] = (0.5, 0.8, 0.95), window: int = 1000) -> None:
        self._cap = max(int(capacity), 0)
        self._real = [_LayerLFU(d) for d in decays]  # scores + heaps over the real cache's keys
        self._shadow = [_LayerLFU(d) for d in decays]  # scores + heaps over each shadow's keys
        self._sets: list[set[Key]] = [set() for _ in decays]
        self._hits = [0.0] * len(decays)
        self._fade = 1.0 - 1.0 / max(window, 1)
        self.leader = len(decays) - 1
        self._pinned: set[Key] = set()

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        for p in (*self._real, *self._shadow):
            p.step(group, n_tokens)
        self._pinned = set()

    def access(self, key: Key, uses: int = 1) -> None:
        self._pinned.add(key)  # a step's keys arrive together: pin the ones seen so far
        for p in self._real:
            p.access(key, uses)
        for i, (p, keys) in enumerate(zip(self._shadow, self._sets, strict=True)):
            p.access(key, uses)
            self._hits[i] *= self._fade
            if key in keys:
                self._hits[i] += 1.0
                continue
            if self._cap <= 0:
                continue
            if len(keys) >= self._cap:
                v = p.victim(self._pinned)
                if v is None or not p.admit(key, v):
                    continue
                keys.discard(v)
                p.remove(v)
            keys.add(key)
            p.insert(key)
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
        if self.policy == "adaptive":
            opts.setdefault("capacity", self.budget_bytes // max(self.item_bytes, 1))
        self._pol = make_policy(self.policy, **opts)
        if isinstance(self._pol, _TinyLFU):
            self._pol.sample = max(10 * (self.budget_bytes // max(self.item_bytes, 1)), 100)
        self._items: dict[Key, tuple[Any, int]] = {}
        self.used_bytes = 0

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        """Announce a new step of ``group`` (a layer) over ``n_tokens`` tokens before its lookups."""
        self._pol.step(group, n_tokens)

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
           uses: Sequence[tuple[int, Sequence[int]]] | None = None, **policy_opts: Any) -> CacheStats:
    """Replay a trace of steps (each: the keys one layer needs at once) on an item-bounded cache.

    Keys of one step are pinned together, mirroring the runtime (a layer's experts are all in
    use during its step). A step's group (its layer) is its first key's ``[0]`` for tuple keys.
    ``uses`` (optional, parallel to ``trace``): per step, (tokens in the step, tokens per key).
    """
    c = ExpertCache(budget_bytes=capacity, policy=policy, policy_opts=policy_opts)
    for i, step in enumerate(trace):
        n, per_key = uses[i] if uses is not None else (1, [1] * len(step))
        if step:
            k0 = step[0]
            c.step(k0[0] if isinstance(k0, tuple) else None, n)
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
