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
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Key = Hashable
POLICIES = ("lru", "lfu-da", "tinylfu")


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
    def access(self, key: Key) -> None:
        """Every request (hit or miss), before touch/insert."""

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

    def access(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._n += 1
        if self._n >= self.sample:  # aging: halve every count
            self._n = 0
            self._count = {k: c // 2 for k, c in self._count.items() if c > 1}

    def admit(self, key: Key, victim: Key) -> bool:
        return self._count.get(key, 0) > self._count.get(victim, 0)


def make_policy(name: str) -> _Policy:
    if name == "lru":
        return _LRU()
    if name == "tinylfu":
        return _TinyLFU()
    if name == "lfu-da":
        return _LFUDA()
    raise ValueError(f"unknown cache policy {name!r} (choose from {', '.join(POLICIES)})")


@dataclass
class ExpertCache:
    """Holds expert buffers up to ``budget_bytes``; ``pinned`` keys (in use this step) never leave."""

    budget_bytes: int
    policy: str = "lru"
    stats: CacheStats = field(default_factory=CacheStats)
    on_evict: Callable[[Key, Any], None] | None = None  # e.g. return the buffer to a pool

    item_bytes: int = 1  # typical item size: sets TinyLFU's aging window (10 x capacity in items)

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError("cache budget must be >= 0")
        self._pol = make_policy(self.policy)
        if isinstance(self._pol, _TinyLFU):
            self._pol.sample = max(10 * (self.budget_bytes // max(self.item_bytes, 1)), 100)
        self._items: dict[Key, tuple[Any, int]] = {}
        self.used_bytes = 0


    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, key: Key) -> Any | None:
        """Return the cached buffer (a hit, counted) or None (a miss, counted)."""
        self._pol.access(key)
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

def replay(trace: Sequence[Sequence[Key]], capacity: int, policy: str) -> CacheStats:
    """Replay a trace of steps (each: the keys one layer needs at once) on an item-bounded cache.

    Keys of one step are pinned together, mirroring the runtime (a layer's experts are all in
    use during its step).
    """
    c = ExpertCache(budget_bytes=capacity, policy=policy)
    for step in trace:
        for k in step:
            if c.lookup(k) is None:
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
