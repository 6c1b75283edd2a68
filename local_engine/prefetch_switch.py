"""Turns next-layer prefetch on or off from the decode's own measured speed.

Whether prefetch pays depends on the machine more than on the model: it hides read latency behind
compute, and costs the disk time of its wrong guesses (a third or more of them). Slow reads next to
fast compute favour it, a saturated disk or cheap reads do not. Measured on one box, the same
budget flipped from 1.56x to 0.95x when reads got cheaper (docs/moe.md). So instead of a fixed rule
the decode tries both, in interleaved blocks of tokens, and keeps the faster; it re-checks now and
then because disks and CPU load drift.

Pure bookkeeping: the caller asks ``choose()`` before a decode token and reports its wall time with
``record()``. No clock, no threads, so it is tested with synthetic timings.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class PrefetchSwitch:
    block: int = 4  # tokens per trial block
    rounds: int = 3  # ABBA pairs of blocks in the first trial (on/off/off/on/...)
    exploit: int = 64  # tokens run on the decision before trying both again
    recheck_rounds: int = 1  # pairs of blocks in each later trial
    margin: float = 0.01  # prefetch must be this much faster: its wrong guesses cost disk bytes

    decision: bool = False
    trials: int = 0  # completed trials
    on_tokens: int = 0
    off_tokens: int = 0
    _schedule: list[bool] = field(default_factory=list)
    _blocks: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})
    _cur: list[float] = field(default_factory=list)
    _left: int = 0  # tokens left on the current decision
    _ratio: float | None = None  # smoothed on/off time ratio over trials

    def __post_init__(self) -> None:
        self._schedule = self._abba(self.rounds)

    def _abba(self, pairs: int) -> list[bool]:
        # on, off, off, on, ...: a drift that is linear in time hits both arms alike
        blocks = [b for i in range(pairs) for b in ((True, False) if i % 2 == 0 else (False, True))]
        return [b for b in blocks for _ in range(self.block)]

    def choose(self) -> bool:
        """Prefetch for the next decode token?"""
        if self._schedule:
            return self._schedule[0]
        return self.decision

    def record(self, on: bool, seconds: float) -> None:
        """The wall time of the decode token just run with prefetch ``on``."""
        if on:
            self.on_tokens += 1
        else:
            self.off_tokens += 1
        if not self._schedule:
            self._left -= 1
            if self._left <= 0:
                self._schedule = self._abba(self.recheck_rounds)
            return
        self._schedule.pop(0)
        self._cur.append(seconds)
        if len(self._cur) == self.block:  # a block is one arm throughout: the schedule says so
            self._blocks[on].append(statistics.fmean(self._cur))
            self._cur = []
        if not self._schedule:
            self._decide()

    def _decide(self) -> None:
        on, off = statistics.median(self._blocks[True]), statistics.median(self._blocks[False])
        ratio = on / off if off > 0 else 1.0
        # earlier trials still count, half as much each time: one noisy block pair cannot flip it
        self._ratio = ratio if self._ratio is None else 0.5 * self._ratio + 0.5 * ratio
        self.decision = self._ratio < 1.0 - self.margin
        self._blocks = {True: [], False: []}
        self.trials += 1
        self._left = self.exploit

    def stats(self) -> dict[str, float | int | bool]:
        out: dict[str, float | int | bool] = {
            "prefetch_auto_decision": self.decision, "prefetch_auto_trials": self.trials,
            "prefetch_auto_on_tokens": self.on_tokens, "prefetch_auto_off_tokens": self.off_tokens}
        if self._ratio is not None:  # seconds per token with prefetch / without, smoothed over trials
            out["prefetch_auto_time_ratio"] = self._ratio
        return out
