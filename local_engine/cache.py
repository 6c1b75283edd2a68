"""Byte-bounded expert cache with pluggable eviction and hit/miss stats: the container
(``ExpertCache``) and the policies by name (``make_policy``); the policies themselves are in
``cache_policies.py`` (recency / frequency), ``router_policy.py`` and ``adaptive_policy.py``.

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
  counts included), with admission. See ``cache_policies.LayerLFU``.
- ``adaptive`` (default): ``layer-lfu`` with the decay chosen online among a few candidates by shadow
  caches (short memory for sticky routing, long memory for stable favourites): ``adaptive_policy.py``.
- ``router-lfu``: scores from the router's softmax over ALL of a layer's experts (passed with
  ``ExpertCache.step(..., probs=...)``, one vector per layer step), e.g. the calibrated chance of
  being in the layer's next top-k. See ``router_policy.RouterLFU``.
- ``router``: ``adaptive``'s choice by shadow caches over ``adaptive``'s three candidates plus two
  router-driven ones (``ROUTER_CANDIDATES``). Better than ``adaptive`` where routing drifts slowly
  (synthetic router traces: +0.01 to +0.06 of Belady), equal on the random-router checkpoint (no
  temporal signal to exploit); about four times its bookkeeping (a recorded 64-token trace of 24 x 64
  experts replayed at a 5% budget: router 6.7 ms a token, adaptive 1.6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from local_engine.adaptive_policy import AdaptiveLayerLFU
from local_engine.cache_policies import LFUDA, LRU, Key, LayerLFU, Policy, TinyLFU
from local_engine.router_policy import RouterLFU

POLICIES = ("lru", "lfu-da", "tinylfu", "layer-lfu", "adaptive", "router-lfu", "router")
ROUTER_AWARE_POLICIES = ("router-lfu", "router")  # the ones whose `observe` reads router probabilities
DEFAULT_POLICY = "adaptive"


@dataclass
class CacheStats:
    """What an ``ExpertCache`` did since it was made: lookups found / not found, items pushed out
    to make room, items taken in, items refused."""

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

# little (0.3) or much (0.9) weight on the current token (stable favourites vs sticky routing). The
# last one leads until another proves better: as ``adaptive``, long-memory frequency.
ROUTER_CANDIDATES: tuple[dict[str, float], ...] = (
    {"decay": 0.5},
    {"decay": 0.8},
    {"decay": 0.98, "used": 0.0, "logit": 1.0, "logit_now": 0.3},
    {"decay": 0.98, "used": 0.0, "logit": 1.0, "logit_now": 0.9},
    {"decay": 0.95},
)


def make_policy(name: str, **opts: Any) -> Policy:
    if name == "lru":
        return LRU()
    if name == "tinylfu":
        return TinyLFU()
    if name == "lfu-da":
        return LFUDA()
    if name == "layer-lfu":
        return LayerLFU(**opts)
    if name == "adaptive":
        return AdaptiveLayerLFU(**opts)
    if name == "router-lfu":
        return RouterLFU(**opts)
    if name == "router":
        cands = opts.pop("candidates", ROUTER_CANDIDATES)
        return AdaptiveLayerLFU(candidates=[functools.partial(RouterLFU, **c) for c in cands], **opts)
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
        if isinstance(self._pol, TinyLFU):
            self._pol.sample = max(10 * (self.budget_bytes // max(self.item_bytes, 1)), 100)
        self._items: dict[Key, tuple[Any, int]] = {}
        self.used_bytes = 0
        # the policy's last victim and the pinned set it was asked with, until the policy hears
        # anything else: a step's refused misses (most of them at small budgets) ask again and again
        self._victim: tuple[AbstractSet[Key], Key | None] | None = None

    def step(self, group: Hashable, n_tokens: int = 1, probs: Sequence[float] | None = None) -> None:
        """Announce a new step of ``group`` (a layer) over ``n_tokens`` tokens before its lookups;
        ``probs``: the router's probability for each of the layer's experts (mean over the tokens)."""
        self._victim = None
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
        self._victim = None
        self._pol.access(key, uses)
        item = self._items.get(key)
        if item is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._pol.touch(key)
        return item[0]

    def lookup_many(self, keys: Sequence[Key], uses: Sequence[int]) -> list[Any | None]:
        """``lookup`` of each of a step's keys, in order: the policy hears of them in one call."""
        self._victim = None
        self._pol.access_many(keys, uses)
        out: list[Any | None] = []
        for key in keys:
            item = self._items.get(key)
            if item is None:
                self.stats.misses += 1
                out.append(None)
            else:
                self.stats.hits += 1
                self._pol.touch(key)
                out.append(item[0])
        return out

    def _pick(self, pin: AbstractSet[Key]) -> Key | None:
        """The policy's victim for ``pin`` for an admission check; asked again only after the policy
        has heard of a change (each policy answers the same while nothing changed)."""
        last = self._victim
        if last is not None and (last[0] is pin or last[0] == pin):
            return last[1]
        v = self._pol.victim(pin)
        self._victim = (pin, v)
        return v

    def insert(self, key: Key, value: Any, nbytes: int, pinned: Iterable[Key] = ()) -> bool:
        """Admit ``value``, evicting unpinned items as needed. False if it cannot fit.

        ``pinned``: a frozenset is used as it is (pass the same one for all of a step's inserts)."""
        if key in self._items:
            return True
        if nbytes > self.budget_bytes:
            self.stats.rejected += 1
            return False
        pin = pinned if isinstance(pinned, frozenset) else frozenset(pinned)
        if self.used_bytes + nbytes > self.budget_bytes:
            v = self._pick(pin)
            if v is None or not self._pol.admit(key, v):
                self.stats.rejected += 1
                return False
        while self.used_bytes + nbytes > self.budget_bytes:
            # asked afresh, as before: lfu-da's answer moves its victim behind equal priorities,
            # so asking again names the next of them, and that is the one it has always evicted
            self._victim = None
            v = self._pol.victim(pin)
            if v is None:
                self.stats.rejected += 1
                return False
            self._evict(v)
        self._items[key] = (value, nbytes)
        self.used_bytes += nbytes
        self._victim = None
        self._pol.insert(key)
        self.stats.inserts += 1
        return True

    def _evict(self, key: Key) -> None:
        value, n = self._items.pop(key)
        self._victim = None
        self._pol.remove(key)
        self.used_bytes -= n
        self.stats.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key, value)

    def clear(self) -> None:
        for k in list(self._items):
            self._evict(k)
