"""``speculative: auto``: how many tokens to draft (k, 0 = none) from measured costs and acceptance.

A verify of k drafts runs k + 1 rows in one forward. It pays when the tokens it is expected to
yield, per second, beat a single step's one token per step time:

    E(k) = 1 + s_1 + s_1 s_2 + ... + s_1 ... s_k      (s_j: P(draft j accepted | drafts < j were))
    rate(k) = E(k) / (C(k + 1) + k D)                 (C(m): seconds of an m-row forward, C(1) a
                                                       step; D: seconds to draft one token)

and ``best_k`` picks the k with the highest rate (0 when none beats 1 / C(1)). Both inputs are
measured while decoding, not assumed:

- ``VerifyCosts`` (one per model: an engine's): moving averages of the seconds of a step and of
  each verify size. The curve is not linear (the kernel's row tiles: on the built-in model an
  8-row verify costs ~3.5 steps, a 2-row one ~1.8, 16 rows ~6.1), so each size keeps its own
  figure; a size never run is priced optimistically between measured ones (so it is tried once),
  or extrapolated past the largest at ``PRIOR_ROW_STEPS`` a row.
- ``Acceptance``: per draft position j, how many verifies got as far as j and how many accepted it.
  Not one geometric rate: prompt-lookup drafts are bimodal (a quote is copied 15 tokens at a time,
  a wrong n-gram fails at its first token), so the conditional rates differ by position. Kept per
  request (``SpecController``) and per model (its prior, shared by the model's later requests),
  per draft source (prompt lookup per length of the n-gram it matched: 1-token matches in open
  chat were right 1 time in 8, 4-token ones in a quote nearly always).

Re-probing: a source whose drafts stopped paying is not drafted for; after ``reprobe`` declined
chances the controller drafts once at the best k > 0 anyway (the text may have turned to quoting),
and doubles the wait after each probe that accepted nothing (``max_wait`` at most), like
``prefetch_switch``'s periodic re-trials. Pure bookkeeping: the caller reports seconds; no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# the most drafts a verify runs: 16 rows (models/llama.py FEW_TOKENS, the fast verify path)
K_MAX = 15
# cost of an extra verify row, in single steps, past the largest size measured (the built-in
# model's curve rises ~0.3-0.4 steps a row past 8 rows: benchmarks/results/speculative.txt)
PRIOR_ROW_STEPS = 0.4
# between two measured sizes: an extra row priced at this (optimistic: the size gets tried)
OPTIMISTIC_ROW_STEPS = 0.1
# an unmeasured position's acceptance before any request has drafted there
PRIOR_ACCEPT = 0.5
# a drafter's seconds per drafted token before it was measured, in single steps of the target
# (a draft model is meant to be several times cheaper; the first measurement replaces this)
PRIOR_DRAFT_STEPS = 0.25

def expected_tokens(accept: Sequence[float], k: int) -> float:
    """Tokens a verify of ``k`` drafts yields on average: the accepted drafts + the token decided
    at the first rejected position (or after the last draft)."""
    e, surv = 1.0, 1.0
    for j in range(k):
        surv *= accept[j]
        e += surv
    return e


def best_k(accept: Sequence[float], cost: Sequence[float], k_max: int, draft_s: float = 0.0,
           margin: float = 0.0) -> int:
    """The number of drafts (0..``k_max``) that maximises expected tokens per second.

    ``accept[j]``: P(draft j + 1 accepted | the drafts before it were); ``cost[m]``: seconds of an
    m-row forward (``cost[1]``: a single step); ``draft_s``: seconds to draft one token. A k > 0
    must beat a step by ``margin`` (relative) to be chosen."""
    best, best_rate = 0, (1.0 + margin) / cost[1]
    for k, rate in enumerate(_rates(accept, cost, k_max, draft_s), start=1):
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def best_positive_k(accept: Sequence[float], cost: Sequence[float], k_max: int, draft_s: float = 0.0) -> int:
    """``best_k`` among k >= 1 (a probe's size): the k that would be chosen if drafting paid."""
    rates = _rates(accept, cost, k_max, draft_s)
    return 1 + max(range(len(rates)), key=rates.__getitem__) if rates else 0


def _rates(accept: Sequence[float], cost: Sequence[float], k_max: int, draft_s: float) -> list[float]:
    """Expected tokens per second of k = 1 .. k_max drafts (``expected_tokens`` kept running)."""
    out, e, surv = [], 1.0, 1.0
    for k in range(1, min(k_max, len(accept), len(cost) - 2) + 1):
        surv *= accept[k - 1]
        e += surv
        out.append(e / (cost[k + 1] + k * draft_s))
    return out


@dataclass
class VerifyCosts:
    """Moving averages of the seconds of an m-row decode forward, m = 1 (a step) .. K_MAX + 1.

    On a shared box the noise is one-sided (another process only ever slows a forward down) and a
    rarely used size keeps a spike for long, so a slower sample moves its average by ``alpha_up``
    only, a faster one by ``alpha``; and the curve never lets m rows cost more than a larger
    measured size (fewer rows are never slower)."""

    alpha: float = 0.25  # weight of a new measurement that is faster than the average
    alpha_up: float = 0.1  # ... and of one that is slower
    seconds: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    _curve: list[float] = field(default_factory=list)  # ``curve(K_MAX)`` until the next record

    def record(self, rows: int, seconds: float) -> None:
        self._curve = []
        old = self.seconds.get(rows)
        a = self.alpha if old is None or seconds < old else self.alpha_up
        self.seconds[rows] = seconds if old is None else (1 - a) * old + a * seconds
        self.counts[rows] = self.counts.get(rows, 0) + 1

    @property
    def step_s(self) -> float | None:
        return self.seconds.get(1)

    def curve(self, k_max: int = K_MAX) -> list[float]:
        """Seconds of an m-row forward at index m (index 0 unused), for m up to ``k_max`` + 1:
        measured sizes as measured, others between two measured sizes at the smaller one's cost +
        ``OPTIMISTIC_ROW_STEPS`` a row (at most the larger one's), past the largest extrapolated at ``PRIOR_ROW_STEPS`` steps a row. Needs a measured step."""
        if not self._curve:
            est = self._estimate(K_MAX)
            for m in range(K_MAX, 1, -1):  # isotonic from above: m rows cost at most m + 1 rows
                est[m] = min(est[m], est[m + 1])
            self._curve = est
        return self._curve[:k_max + 2]

    def _estimate(self, k_max: int) -> list[float]:
        step = self.seconds[1]
        known = sorted(self.seconds.items())
        out = [0.0, step]
        for m in range(2, k_max + 2):
            if m in self.seconds:
                out.append(self.seconds[m])
                continue
            lo = max((p for p in known if p[0] < m), key=lambda p: p[0])
            hi = min((p for p in known if p[0] > m), key=lambda p: p[0], default=None)
            if hi is None:
                out.append(lo[1] + PRIOR_ROW_STEPS * step * (m - lo[0]))
            else:
                # optimistic, so that an unmeasured size is tried once: the staircase is cheap at
                # the end of a tile (8 rows ~3.3 steps, 9 rows ~4.9), which a line through its
                # neighbours would hide for good
                out.append(min(hi[1], lo[1] + OPTIMISTIC_ROW_STEPS * step * (m - lo[0])))
        return out


@dataclass
class Acceptance:
    """Per draft position j (0-based): verifies that got as far as j, and that accepted it there."""

    tried: list[float] = field(default_factory=lambda: [0.0] * K_MAX)
    accepted: list[float] = field(default_factory=lambda: [0.0] * K_MAX)

    def record(self, drafted: int, accepted: int) -> None:
        for j in range(min(accepted + 1, drafted)):
            self.tried[j] += 1
        for j in range(accepted):
            self.accepted[j] += 1

    def rates(self, prior: Sequence[float] | None = None, weight: float = 2.0) -> list[float]:
        """P(accept j | reached j): this table's counts shrunk towards ``prior`` (``weight``
        pseudo-verifies). Without a prior, towards the rate at the position before (``PRIOR_ACCEPT``
        at the first): a position no verify reached yet is as likely as the last one reached, so
        after drafts that were all accepted a longer draft is tried, not ruled out by a guess."""
        out: list[float] = []
        for j, (a, t) in enumerate(zip(self.accepted, self.tried, strict=True)):
            p = prior[j] if prior is not None else out[j - 1] if j else PRIOR_ACCEPT
            out.append((a + weight * p) / (t + weight))
        return out


@dataclass
class ModelSpec:
    """What a model's requests learned, for its later ones: verify costs, and per draft source its
    seconds per drafted token and its acceptance."""

    costs: VerifyCosts = field(default_factory=VerifyCosts)
    draft_s: dict[str, float] = field(default_factory=dict)  # seconds to draft a token, per source
    acceptance: dict[str, Acceptance] = field(default_factory=dict)

    def record_draft(self, source: str, tokens: int, seconds: float) -> None:
        if tokens > 0:
            old, new = self.draft_s.get(source), seconds / tokens
            self.draft_s[source] = new if old is None else 0.75 * old + 0.25 * new

    def table(self, source: str) -> Acceptance:
        return self.acceptance.setdefault(source, Acceptance())


@dataclass
class SpecController:
    """One request's choice of k, from its own acceptance and its model's (``ModelSpec``).

    A source is where drafts come from, as finely as its acceptance differs: prompt lookup is
    keyed by the length of the n-gram it matched ("lookup:1" .. "lookup:3": a 1-token match is
    right ~1 time in 8 in open chat, a 3-token one in a quote almost always), a draft model by
    its name."""

    model: ModelSpec
    probe_steps: int = 2  # single steps measured before the first verify when the model has none
    reprobe: int = 8  # declined chances of a source before a probe verify
    max_wait: int = 128  # the longest wait between probes of a source that keeps losing
    margin: float = 0.03  # drafting must beat a step by this much: noise on a busy box
    weight: float = 2.0  # pseudo-verifies of the model's acceptance in a request's estimate
    tables: dict[str, Acceptance] = field(default_factory=dict)
    _declined: dict[str, int] = field(default_factory=dict)
    _wait: dict[str, int] = field(default_factory=dict)
    probing: bool = False
    decisions: dict[int, int] = field(default_factory=dict)  # k chosen -> how often (stats)
    probes: int = 0

    def choose(self, source: str, available: int = K_MAX, free: bool = False) -> int:
        """Drafts to verify next from ``source`` (``available``: the most it can give now; ``free``:
        drafting costs nothing, as prompt lookup's); 0: a single step."""
        costs = self.model.costs
        self.probing = False
        if available <= 0 or costs.counts.get(1, 0) < self.probe_steps:
            return 0
        accept = self.rates(source)
        curve = costs.curve(min(available, K_MAX))
        draft_s = 0.0 if free else self.model.draft_s.get(source, PRIOR_DRAFT_STEPS * curve[1])
        k = best_k(accept, curve, available, draft_s, self.margin)
        if k == 0:
            declined = self._declined.get(source, 0) + 1
            self._declined[source] = declined
            if declined >= self._wait.get(source, self.reprobe):
                k, self.probing = best_positive_k(accept, curve, available, draft_s), True
                self._declined[source] = 0
                self.probes += 1
        self.decisions[k] = self.decisions.get(k, 0) + 1
        return k

    def rates(self, source: str) -> list[float]:
        prior = self.model.table(source).rates()
        return self.tables.setdefault(source, Acceptance()).rates(prior, self.weight)

    def record_step(self, seconds: float) -> None:
        self.model.costs.record(1, seconds)

    def record_verify(self, source: str, drafted: int, accepted: int, seconds: float) -> None:
        """A verify of ``drafted`` drafts (``seconds``: the verify alone, not the drafting)."""
        self.model.costs.record(drafted + 1, seconds)
        self.tables.setdefault(source, Acceptance()).record(drafted, accepted)
        self.model.table(source).record(drafted, accepted)
        if self.probing:  # a probe that accepted nothing: wait twice as long before the next
            wait = self._wait.get(source, self.reprobe)
            self._wait[source] = min(wait * 2, self.max_wait) if accepted == 0 else self.reprobe
            self.probing = False
