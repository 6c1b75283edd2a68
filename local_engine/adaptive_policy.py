"""``adaptive`` and ``router``: the expert cache's policy that follows whichever of several candidate
policies (layer-LFU decays, router-driven scores) has been hitting most lately, by shadow caches."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from collections.abc import Set as AbstractSet

from local_engine.cache_policies import Key, LayerLFU, Policy


class AdaptiveLayerLFU(Policy):
    """layer-LFU whose decay follows whichever of a few candidates has been hitting most lately.

    How fast popularity should be forgotten depends on the routing: a router with stable
    favourites wants a long memory (decay near 1), one with token-to-token reuse wants a short one.
    Each candidate decay runs a shadow cache (keys only, same capacity in bundles) fed the same
    requests; the real cache takes its eviction and admission decisions from the candidate whose
    shadow has the most hits, counted with exponential forgetting over a few tokens' requests.
    Cost: a few dict/heap operations per candidate per request, negligible next to a bundle read.
    """

    def __init__(self, capacity: int, decays: Sequence[float] = (0.5, 0.8, 0.95), window: int = 1000,
                 candidates: Sequence[Callable[[], Policy]] | None = None) -> None:
        self._cap = max(int(capacity), 0)
        make = list(candidates) if candidates is not None else [lambda d=d: LayerLFU(d) for d in decays]
        self._real = [m() for m in make]  # scores (+ heaps) over the real cache's keys
        # heaps over each shadow's keys; scores shared with the real one where the policy allows
        self._shadow = [t if (t := r.twin()) is not None else m() for r, m in zip(self._real, make, strict=True)]
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
        pinned = frozenset(self._pinned)  # frozen: a policy may remember its groups for the flush
        for p, keys, missed in zip(self._shadow, self._sets, self._missed, strict=True):
            if not missed:
                continue
            asked, v = False, None  # a refused miss changes nothing: the victim stays the same
            for key in missed:
                if len(keys) >= self._cap:
                    if not asked:
                        asked, v = True, p.victim(pinned)
                    if v is None or not p.admit(key, v):
                        continue
                    keys.discard(v)
                    p.remove(v)
                keys.add(key)
                p.insert(key)
                asked = False
            missed.clear()

    def access(self, key: Key, uses: int = 1) -> None:
        self._pinned.add(key)
        for p in self._real:
            p.access(key, uses)
        for p in self._shadow:
            p.access(key, uses)
        self._tally((key,))
        if not self._stepped:  # used without steps: every request is its own step
            self._flush()
            self._pinned = set()

    def access_many(self, keys: Sequence[Key], uses: Sequence[int]) -> None:
        if not self._stepped or len(set(keys)) != len(keys):
            # key by key: a shadow's heap entry takes the shared score as it is at its access
            for key, u in zip(keys, uses, strict=True):
                self.access(key, u)
            return
        self._pinned.update(keys)
        for p in self._real:  # each candidate's owner first: its twin (the shadow) reads the scores
            p.access_many(keys, uses)
        for p in self._shadow:
            p.access_many(keys, uses)
        self._tally(keys)

    def _tally(self, keys: Sequence[Key]) -> None:
        """Each shadow's hits (faded), its misses to insert at the step's end, and the leader,
        request by request."""
        hits, fade, cap, sets, missed = self._hits, self._fade, self._cap, self._sets, self._missed
        leader = self.leader
        for key in keys:
            for i, held in enumerate(sets):
                hits[i] *= fade
                if key in held:
                    hits[i] += 1.0
                elif cap > 0:
                    missed[i].append(key)
            top = max(hits)
            if top > hits[leader]:  # the first of the best, as max over indices
                leader = hits.index(top)
        self.leader = leader

    def admit(self, key: Key, victim: Key) -> bool:
        return self._real[self.leader].admit(key, victim)

    def insert(self, key: Key) -> None:
        for p in self._real:
            p.insert(key)

    def remove(self, key: Key) -> None:
        for p in self._real:
            p.remove(key)

    def victim(self, pinned: AbstractSet[Key]) -> Key | None:
        return self._real[self.leader].victim(pinned)
