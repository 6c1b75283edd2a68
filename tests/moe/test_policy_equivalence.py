"""The expert cache's fast bookkeeping makes exactly the decisions of the straightforward versions in
``policy_reference.py``: every hit, miss, admission, refusal and eviction, in order, and which
candidate ``adaptive`` / ``router`` follows after every step, on replays of routing traces."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Hashable
from typing import Any

import pytest

from local_engine.adaptive_policy import AdaptiveLayerLFU
from local_engine.cache import ROUTER_CANDIDATES, ExpertCache
from local_engine.cache_policies import LFUDA, LRU, Key, Policy, TinyLFU
from local_engine.router_policy import RouterLFU
from tests.moe.policy_reference import RefAdaptive, RefCache, RefLayerLFU

# one step: (group, keys, tokens in the step, uses per key, router probabilities or None, bytes per key)
Step = tuple[Hashable, list[Key], int, list[int], list[float] | None, list[int]]


def routed_trace(tokens: int, layers: int = 6, experts: int = 32, k: int = 4, rho: float = 0.7,
                 prefill: int = 8, seed: int = 0, sizes: tuple[int, ...] = (1,)) -> list[Step]:
    """Router-like steps: skewed popularity plus AR(1) noise (slow drift, ties in history across
    layers and experts), a prefill step per layer every 40 tokens (n tokens, uses per expert), and
    the softmax as the router probabilities."""
    rng = random.Random(seed)
    base = [[-1.1 * math.log(r + 1) for r in rng.sample(range(experts), experts)] for _ in range(layers)]
    z = [[rng.gauss(0.0, 1.0) for _ in range(experts)] for _ in range(layers)]
    out: list[Step] = []
    for t in range(tokens):
        n = prefill if t % 40 == 0 else 1
        for layer in range(layers):
            counts: dict[int, int] = {}
            for _ in range(n):
                z[layer] = [rho * x + math.sqrt(1 - rho * rho) * rng.gauss(0.0, 1.0) for x in z[layer]]
                lg = [b + x for b, x in zip(base[layer], z[layer], strict=True)]
                for e in sorted(range(experts), key=lg.__getitem__, reverse=True)[:k]:
                    counts[e] = counts.get(e, 0) + 1
            m = max(lg)
            ex = [math.exp(x - m) for x in lg]
            probs = [x / sum(ex) for x in ex]
            es = sorted(counts)
            out.append((layer, [(layer, e) for e in es], n, [counts[e] for e in es], probs,
                        [rng.choice(sizes) for _ in es]))
    return out


def string_trace(steps: int, seed: int = 3) -> list[Step]:
    """Keys that are not (layer, expert): one group (None), steps of a few keys, no router."""
    rng = random.Random(seed)
    out: list[Step] = []
    for _ in range(steps):
        keys: list[Key] = [f"k{rng.randrange(40)}" for _ in range(3)]
        keys = list(dict.fromkeys(keys))
        out.append((None, keys, 1, [1] * len(keys), None, [1] * len(keys)))
    return out


def run_new(trace: list[Step], budget: int, policy: str, batched: bool, **opts: Any) -> tuple[list[Any], list[int]]:
    """``batched``: a step's lookups in one ``lookup_many`` (as ExpertStore.request does), else one by one."""
    log: list[Any] = []
    c = ExpertCache(budget, policy, on_evict=lambda k, _v: log.append(("evict", k)), policy_opts=opts)
    pol = c._pol
    leaders: list[int] = []
    for g, keys, n, uses, probs, sizes in trace:
        c.step(g, n, probs if policy.startswith("router") else None)
        missed = []
        found = c.lookup_many(keys, uses) if batched else [c.lookup(key, u) for key, u in zip(keys, uses, strict=True)]
        for key, b, item in zip(keys, sizes, found, strict=True):
            hit = item is not None
            log.append(("hit" if hit else "miss", key))
            if not hit:
                missed.append((key, b))
        for key, b in missed:
            log.append(("in" if c.insert(key, key, b, pinned=keys) else "out", key))
        if isinstance(pol, AdaptiveLayerLFU):
            leaders.append(pol.leader)
    return log, leaders


def run_ref(trace: list[Step], budget: int, pol: Policy, router: bool) -> tuple[list[Any], list[int]]:
    c = RefCache(budget, pol)
    leaders: list[int] = []
    for g, keys, n, uses, probs, sizes in trace:
        c.step(g, n, probs if router else None)
        missed = [(key, b) for key, u, b in zip(keys, uses, sizes, strict=True) if not c.lookup(key, u)]
        for key, b in missed:
            c.insert(key, b, pinned=keys)
        if isinstance(pol, RefAdaptive):
            leaders.append(pol.leader)
    return c.log, leaders


REFS: dict[str, Callable[[int, dict[str, Any]], Policy]] = {
    "layer-lfu": lambda cap, o: RefLayerLFU(**o),
    "adaptive": lambda cap, o: RefAdaptive(cap, [lambda d=d: RefLayerLFU(d) for d in (0.5, 0.8, 0.95)]),
    "router": lambda cap, o: RefAdaptive(cap, [functools.partial(RouterLFU, **c) for c in ROUTER_CANDIDATES]),
    "router-lfu": lambda cap, o: RouterLFU(**o),
    "lru": lambda cap, o: LRU(),
    "lfu-da": lambda cap, o: LFUDA(),
}


def _same(trace: list[Step], budget: int, policy: str, **opts: Any) -> None:
    ref = REFS[policy](budget, opts) if policy != "tinylfu" else TinyLFU()
    if isinstance(ref, TinyLFU):
        ref.sample = max(10 * budget, 100)
    ref_log, ref_leaders = run_ref(trace, budget, ref, policy.startswith("router"))
    assert sum(1 for e in ref_log if e[0] == "evict") > 0  # the budget is tight
    for batched in (False, True):
        new_log, new_leaders = run_new(trace, budget, policy, batched, **opts)
        for i, (a, b) in enumerate(zip(new_log, ref_log, strict=True)):
            assert a == b, f"decision {i} differs (batched={batched}): {a} vs reference {b}"
        assert new_leaders == ref_leaders


@pytest.mark.parametrize("policy,opts", [("layer-lfu", {"decay": 0.5}), ("layer-lfu", {"decay": 0.9}),
                                         ("layer-lfu", {"decay": 1.0}), ("adaptive", {}), ("router", {}),
                                         ("router-lfu", {}), ("lru", {}), ("lfu-da", {}), ("tinylfu", {})])
@pytest.mark.parametrize("budget", [7, 24, 60])
def test_same_decisions_as_the_reference(policy: str, opts: dict[str, Any], budget: int) -> None:
    _same(routed_trace(120), budget, policy, **opts)


@pytest.mark.parametrize("policy", ["layer-lfu", "adaptive", "router", "lru", "lfu-da", "tinylfu"])
def test_same_decisions_with_bundles_of_several_sizes(policy: str) -> None:
    # an insert may evict several bundles (or give up after evicting some)
    _same(routed_trace(80, seed=5, sizes=(1, 2, 3)), 30, policy)


@pytest.mark.parametrize("policy", ["layer-lfu", "adaptive", "lru", "lfu-da", "tinylfu"])
def test_same_decisions_on_keys_without_layers(policy: str) -> None:
    _same(string_trace(600), 9, policy)


@pytest.mark.slow
def test_same_decisions_through_score_rescaling() -> None:
    # decay 0.5's unit passes 1e200 after ~665 steps of a layer (prefill steps count 8): every
    # score and heap is rebuilt, ties among layers re-ordered; decisions must still agree
    trace = routed_trace(760, layers=3, experts=16, k=3)
    _same(trace, 10, "layer-lfu", decay=0.5)
    _same(trace, 10, "adaptive")
