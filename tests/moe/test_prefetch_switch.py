"""PrefetchSwitch: keeps whichever of prefetch on / off decodes faster, from synthetic timings."""

from __future__ import annotations

import random
from collections.abc import Callable

from local_engine.prefetch_switch import PrefetchSwitch


def _drive(sw: PrefetchSwitch, tokens: int, seconds: Callable[[int, bool], float]) -> list[bool]:
    chosen = []
    for t in range(tokens):
        on = sw.choose()
        chosen.append(on)
        sw.record(on, seconds(t, on))
    return chosen


def _noisy(on_s: float, off_s: float, noise: float = 0.1, seed: int = 0) -> Callable[[int, bool], float]:
    rng = random.Random(seed)
    return lambda _t, on: (on_s if on else off_s) * (1.0 + rng.uniform(-noise, noise))


def test_first_trial_interleaves_blocks_so_a_drift_hits_both_arms() -> None:
    sw = PrefetchSwitch(block=2, rounds=3)
    chosen = _drive(sw, 12, lambda _t, _on: 1.0)
    assert chosen == [True, True, False, False, False, False, True, True, True, True, False, False]
    assert sw.trials == 1


def test_keeps_prefetch_when_it_is_faster() -> None:
    sw = PrefetchSwitch()
    chosen = _drive(sw, 300, _noisy(0.8, 1.0))
    assert sw.decision is True
    assert sum(chosen) > 0.8 * len(chosen)


def test_drops_prefetch_when_it_is_slower() -> None:
    sw = PrefetchSwitch()
    chosen = _drive(sw, 300, _noisy(1.2, 1.0))
    assert sw.decision is False
    assert sum(chosen) < 0.2 * len(chosen)


def test_a_tie_within_the_margin_means_off() -> None:
    # prefetch reads wrong guesses too: without a clear gain it is not worth the disk bytes
    sw = PrefetchSwitch(margin=0.05)
    _drive(sw, 200, _noisy(0.98, 1.0, noise=0.01))
    assert sw.decision is False


def test_follows_a_machine_that_changes() -> None:
    sw = PrefetchSwitch()
    fast_on, fast_off = _noisy(0.7, 1.0, seed=1), _noisy(1.3, 1.0, seed=2)
    chosen = _drive(sw, 1000, lambda t, on: fast_on(t, on) if t < 300 else fast_off(t, on))
    assert sw.decision is False
    assert sum(chosen[200:300]) > 80 and sum(chosen[-200:]) < 40


def test_one_outlier_block_does_not_flip_the_decision() -> None:
    sw = PrefetchSwitch()
    base = _noisy(0.8, 1.0, noise=0.02)
    # one block of the first trial's prefetching tokens hit a stall 3x as long as the others
    chosen = _drive(sw, 120, lambda t, on: base(t, on) * (3.0 if t < 4 else 1.0))
    assert sw.decision is True and sum(chosen[24:88]) == 64


def test_stats_report_tokens_and_the_measured_ratio() -> None:
    sw = PrefetchSwitch(block=1, rounds=1)
    assert "prefetch_auto_time_ratio" not in sw.stats()
    _drive(sw, 2, lambda _t, on: 0.5 if on else 1.0)
    s = sw.stats()
    assert s["prefetch_auto_on_tokens"] == 1 and s["prefetch_auto_off_tokens"] == 1
    assert s["prefetch_auto_time_ratio"] == 0.5 and s["prefetch_auto_decision"] is True
