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

A model whose verify cost is not the dense one declares a prior (``speculative.VerifyCostPrior``):
a packed MoE's verify of m positions reads the *union* of their experts, which grows with m far
faster than a dense verify's cost (a random router's 8 rows read ~5x a step's experts, not ~3.5x a
step's time), so the dense extrapolation made a fresh engine's first verifies lose. ``moe_prior``
prices an m-row forward from what the engine knew before its first verify: the share of a decode
step's time spent on experts (reads + expert compute) and the union sizes of m consecutive recent
positions' experts (``RouteWindow``); unmeasured sizes follow that curve, scaled by the nearest
measured size's ratio to it once one is measured.

Learning without paying: a free draft source's (prompt lookup's) draft is scored past what a verify
checks (``Shadow``): all of it when the controller declined it, the rest past the k verified
otherwise; each position is compared with the token plain decoding then decides and recorded as if
verified, as soon as it is known. So acceptance never needs a losing verify, and positions past
the k verified are learnt too; only a verify size's cost needs a verify. On a model priced by a
prior (a packed MoE) a request's own counts are shrunk towards the *other* requests' (its own
counted twice read 3 right shadows as 0.89), with ``PRIOR_WEIGHT_MOE`` pseudo-verifies.

Losses are bounded (``budgeted``, a packed MoE): every verify's net result is kept (verify seconds
in steps minus tokens yielded). While the request's verifies have not lost, net, a k predicted to
pay is verified (a size not measured yet included); once they have, a verify only where the budget
(``explore_share`` of the request's decoded tokens) also holds its whole loss if nothing is
accepted: a prompt whose drafts keep failing stops drafting, one whose verifies won keeps going. A
probe (drafting although no k is predicted to pay) needs the same room, so a short request does
not probe at all. After ``reprobe`` declined chances the controller probes at the best k > 0 (the
text may have turned to quoting), doubling the wait after each probe that accepted nothing
(``max_wait`` at most), like ``prefetch_switch``'s re-trials. Pure
bookkeeping: the caller reports seconds and tokens; no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# the most drafts a verify runs: 16 rows (models/llama.py FEW_TOKENS, the fast verify path)
K_MAX = 15
# cost of an extra verify row, in single steps, past the largest size measured (the built-in
# model's curve rises ~0.3-0.4 steps a row past 8 rows: benchmarks/results/speculative.txt)
PRIOR_ROW_STEPS = 0.4
# between two measured sizes: an extra row priced at this (optimistic: the size gets tried)
OPTIMISTIC_ROW_STEPS = 0.1
# an unmeasured position's acceptance before any request has drafted there
PRIOR_ACCEPT = 0.5
# ... on a model whose verifies are priced by a prior (a packed MoE), at every position not measured
# (not the position before's): a 2-row verify there costs ~1.4-1.7 steps, so a guess must not pay
PRIOR_ACCEPT_MOE = 0.3
# pseudo-verifies at the model's (or the unseen) acceptance that a request's own counts are shrunk
# towards: on the dense staircase a wrong guess costs little
PRIOR_WEIGHT = 2.0
# ... on a packed MoE, where one failed verify costs 2-3% of a 32-token request: at 2, two right
# declined drafts read as 0.65 and a 3-row verify priced 1.78 steps (measured 2.07) accepted
# nothing; at 4 they read as 0.47 (a replay of the recorded answers, tests/engine/test_spec_moe_replay.py)
PRIOR_WEIGHT_MOE = 4.0
# a drafter's seconds per drafted token before it was measured, in single steps of the target
# (a draft model is meant to be several times cheaper; the first measurement replaces this)
PRIOR_DRAFT_STEPS = 0.25
# a packed MoE's non-expert work (attention, resident fp32 projections, the vocabulary head) per extra
# verify row, in that work's single-step time. Measured (benchmarks/verify_cost.py --moe, the verify's
# experts through the one-token kernel per row): 2 rows cost 1.53-1.69 steps at 5-50% budgets, which
# this prices at 1.6-1.7; past 2 rows it overprices (8 rows: 2.7-3.3 measured, ~4.7 priced), so an
# unmeasured size is not tried on its prior alone
MOE_ROW_STEPS = 0.5
# a verify's predicted tokens per second must beat a step's by this much to be chosen: a dense
# verify's cost is noise on a busy box away from its average
MARGIN = 0.03
# ... on a packed MoE: a verify's cost also varies with how many of its rows' experts miss the cache
# (measured 2-row verifies, one after each step: 1.5-1.7 steps median, single ones up to ~2.5), and a
# 32-token request has no room to average a losing streak out; benchmarks/results/speculative.txt
PRIOR_MARGIN = 0.15
# recent decode positions whose experts ``RouteWindow`` keeps
ROUTE_WINDOW = 32
# positions between two recomputations of the union curve: it moves slowly, and recomputing it at
# every step cost 0.6-1.1 ms of a 40 ms MoE step (~2% of the 3% auto may lose; 1 thread, 50% budget)
UNION_REFRESH = 8

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


def moe_prior(union: Sequence[float], expert_share: float, k_max: int = K_MAX) -> list[float]:
    """An m-row forward's seconds in single steps (index m, m = 1 .. ``k_max`` + 1) for a packed MoE.

    ``union[m]``: the mean number of distinct experts per MoE layer that m consecutive positions
    route to (``union[1]``: a step's, top-k); ``expert_share``: the share of a decode step's time
    spent on experts (waiting for reads + their compute). The expert part scales with the experts
    read and multiplied (each once per verify, for all its rows); the rest as fp32 work over a few
    rows (``MOE_ROW_STEPS``). Pessimistic where it is unsure: reads in parallel are priced as
    serial, misses as a step's share of them, and rows as saving no non-expert work."""
    a = min(max(expert_share, 0.0), 1.0)
    return [0.0] + [(1 - a) * (1 + MOE_ROW_STEPS * (m - 1)) + a * union[m] / union[1] for m in range(1, k_max + 2)]


class RouteWindow:
    """The experts each of the last ``size`` decode positions routed to, per MoE layer (bool masks
    [layers, experts]), and the mean union size of m consecutive positions' experts: what an m-row
    verify of such positions reads (``moe_prior``)."""

    def __init__(self, layers: int, experts: int, size: int = ROUTE_WINDOW) -> None:
        self.layers, self.experts = layers, experts
        self.masks: deque[torch.Tensor] = deque(maxlen=size)
        self.version = 0  # bumped per position: a cached union curve is stale when it moved far
        self._union: tuple[int, int, list[float]] | None = None

    def add(self, idx_per_layer: Sequence[torch.Tensor]) -> None:
        """One forward's routing: per MoE layer, idx [rows, top_k]; each row is a position."""
        if not idx_per_layer:
            return
        idx = torch.stack([i.to(torch.long) for i in idx_per_layer])  # [layers, rows, top_k]
        for r in range(idx.shape[1]):
            mask = torch.zeros(self.layers, self.experts, dtype=torch.bool)
            mask.scatter_(1, idx[:, r, :], True)
            self.masks.append(mask)
        self.version += idx.shape[1]

    def __len__(self) -> int:
        return len(self.masks)

    def union_sizes(self, m_max: int) -> list[float]:
        """Index m (1 .. ``m_max``): mean experts per layer in the union of m consecutive positions.
        Past the window's length, each further position brings the share q of the experts not yet
        in the union that the longest measured span implies, U(m) = E - (E - U(1)) (1 - q)^(m - 1)
        (q = 0: positions on the same experts; q = U(1)/E: a uniform router); from one position,
        a uniform router's (the worst case)."""
        if (self._union is not None and self._union[1] == m_max
                and self.version - self._union[0] < UNION_REFRESH):
            return self._union[2]
        stack = torch.stack(list(self.masks))  # [W, layers, experts]
        acc = stack.clone()
        out = [0.0, float(acc.sum(-1).float().mean())]
        for m in range(2, min(m_max, stack.shape[0]) + 1):
            acc = acc[:-1] | stack[m - 1:]
            out.append(float(acc.sum(-1).float().mean()))
        e, m0, u1 = float(self.experts), len(out) - 1, out[1]
        if m0 > 1:
            rest = max(e - min(out[m0], e), 0.0) / max(e - u1, 1e-9)
            keep = rest ** (1 / (m0 - 1))
        else:
            keep = 1 - u1 / e
        out += [e - (e - u1) * keep ** (m - 1) for m in range(m0 + 1, m_max + 1)]
        self._union = (self.version, m_max, out)
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
    # the model's own estimate of an m-row forward in steps (``moe_prior``), or None: the dense
    # staircase's rules (optimistic between measured sizes, ``PRIOR_ROW_STEPS`` past them)
    prior: list[float] | None = None
    _curve: list[float] = field(default_factory=list)  # ``curve(K_MAX)`` until the next record

    def set_prior(self, prior: list[float] | None) -> None:
        if prior != self.prior:
            self.prior, self._curve = prior, []

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
        prior = self.prior
        for m in range(2, k_max + 2):
            if m in self.seconds:
                out.append(self.seconds[m])
                continue
            lo = max((p for p in known if p[0] < m), key=lambda p: p[0])
            if prior is not None:
                # the model's curve, scaled by how the nearest measured size below came out against it
                out.append(prior[m] * lo[1] / prior[lo[0]])
                continue
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

    def record_at(self, j: int, accepted: bool) -> None:
        """Draft position ``j`` reached, and accepted or not (``record``, one position at a time)."""
        self.tried[j] += 1
        self.accepted[j] += accepted

    def without(self, other: Acceptance) -> Acceptance:
        """These counts less ``other``'s (a model's, less one of its requests')."""
        return Acceptance([t - o for t, o in zip(self.tried, other.tried, strict=True)],
                          [a - o for a, o in zip(self.accepted, other.accepted, strict=True)])

    def rates(self, prior: Sequence[float] | None = None, weight: float = 2.0,
              unseen: float | None = None, reached: Sequence[float] | None = None) -> list[float]:
        """P(accept j | reached j): this table's counts shrunk towards ``prior`` (``weight``
        pseudo-verifies). Where there is none (or ``reached``, the prior's own counts of verifies
        that got to a position, is 0 there), towards ``unseen`` where given, else towards the rate at
        the position before (``PRIOR_ACCEPT`` at the first): a position no verify reached yet is as
        likely as the last one reached, so after drafts that were all accepted a longer draft is
        tried, not ruled out by a guess (the dense staircase, where a wrong guess costs little)."""
        out: list[float] = []
        for j, (a, t) in enumerate(zip(self.accepted, self.tried, strict=True)):
            p = (prior[j] if prior is not None and (reached is None or reached[j] > 0)
                 else unseen if unseen is not None else out[j - 1] if j else PRIOR_ACCEPT)
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
class Shadow:
    """A free draft scored against the tokens decided after it: one the controller declined, or the
    part of one past the ``verified`` drafts a verify checks itself."""

    source: str
    draft: list[int]
    verified: int = 0
    matched: int = 0


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
    # drafting must beat a step by this much (relative); None: ``MARGIN``, or ``PRIOR_MARGIN`` for
    # a model whose verifies are priced by its prior (a packed MoE)
    margin: float | None = None
    # pseudo-verifies of the model's acceptance in a request's estimate; None: ``PRIOR_WEIGHT``, or
    # ``PRIOR_WEIGHT_MOE`` for a model whose verifies are priced by its prior (a packed MoE)
    weight: float | None = None
    # where ``budgeted``: once the request's verifies lost, net, the next verify (or probe) must fit
    # its whole loss in this share of the request's decoded tokens, in single steps. 1%, not the 3%
    # auto may lose: a verify's loss as counted leaves out the experts its rejected rows evicted
    # (128 tokens of the repeating prompt at 15%: 0.8% counted, 5% measured, +4% MB/token)
    explore_share: float = 0.01
    # False: exploration is not budgeted (the dense staircase: its optimistic pricing of unmeasured
    # sizes is how auto finds the cheap end of a row tile, and a dense verify's loss is small)
    budgeted: bool = True
    tables: dict[str, Acceptance] = field(default_factory=dict)
    _declined: dict[str, int] = field(default_factory=dict)
    _wait: dict[str, int] = field(default_factory=dict)
    probing: bool = False
    exploring: bool = False  # the verify being chosen is exploratory (its loss is charged)
    decisions: dict[int, int] = field(default_factory=dict)  # k chosen -> how often (stats)
    probes: int = 0
    tokens: int = 0  # tokens decided by the steps and verifies reported so far
    # net steps lost by verifies (negative: they won): every verify where ``budgeted``, else only
    # exploratory ones (a stat there)
    explore_loss: float = 0.0
    shadowed: int = 0  # declined free drafts scored against the decided tokens (stats)
    _shadows: list[Shadow] = field(default_factory=list)

    def choose(self, source: str, available: int = K_MAX, free: bool = False) -> int:
        """Drafts to verify next from ``source`` (``available``: the most it can give now; ``free``:
        drafting costs nothing, as prompt lookup's); 0: a single step."""
        costs = self.model.costs
        self.probing = self.exploring = False
        if available <= 0 or costs.counts.get(1, 0) < self.probe_steps:
            return 0
        accept = self.rates(source)
        curve = costs.curve(min(available, K_MAX))
        margin = self.margin if self.margin is not None else PRIOR_MARGIN if self.prior_priced else MARGIN
        draft_s = 0.0 if free else self.model.draft_s.get(source, PRIOR_DRAFT_STEPS * curve[1])
        k = best_k(accept, curve, available, draft_s, margin)
        if k > 0 and self.budgeted and self.explore_loss > 0:
            # this request's verifies lost, net: the next one only where the budget also holds its
            # loss if nothing is accepted (a prompt whose drafts keep failing stops drafting; one
            # whose verifies won keeps going)
            room = self.budget() - self.explore_loss
            fits = [c if m <= 1 or (c + (m - 1) * draft_s) / curve[1] - 1 <= room else float("inf")
                    for m, c in enumerate(curve)]
            k = best_k(accept, fits, available, draft_s, margin)
        self.exploring = k > 0 and costs.counts.get(k + 1, 0) == 0
        if k == 0:
            declined = self._declined.get(source, 0) + 1
            self._declined[source] = declined
            if declined >= self._wait.get(source, self.reprobe):
                kp = best_positive_k(accept, curve, available, draft_s)
                # the budget must hold the probe's loss if nothing is accepted (its acceptance is a
                # guess; a short request has no room for one)
                worst = (curve[kp + 1] + kp * draft_s) / curve[1] - 1
                if not self.budgeted or self.explore_loss + worst <= self.budget():
                    k, self.probing = kp, True
                    self.exploring = True
                    self._declined[source] = 0
                    self.probes += 1
        self.decisions[k] = self.decisions.get(k, 0) + 1
        return k

    def budget(self) -> float:
        """Steps that this request's verifies may have lost so far, net."""
        return self.explore_share * self.tokens

    @property
    def prior_priced(self) -> bool:
        """The model's verifies are priced by its prior (a packed MoE): the cautious constants apply
        (``PRIOR_MARGIN``, ``PRIOR_WEIGHT_MOE``, ``PRIOR_ACCEPT_MOE``)."""
        return self.model.costs.prior is not None

    def rates(self, source: str) -> list[float]:
        # a model whose verifies are priced by its prior (a packed MoE) guesses low where nothing was
        # measured: a position's acceptance inherited from the one before made auto verify 4 drafts
        # that a repeating prompt's lookups never got past the first of
        unseen = PRIOR_ACCEPT_MOE if self.prior_priced else None
        own = self.tables.setdefault(source, Acceptance())
        others = self.model.table(source)
        if unseen is not None:
            # the model's counts hold this request's too: shrinking towards them counted each of its
            # outcomes twice (3 accepted shadows read as 0.89, where 4 verifies then accepted none).
            # Kept on the dense staircase, where that optimism is how a first request grows its k
            others = others.without(own)
        prior = others.rates(unseen=unseen)
        weight = self.weight if self.weight is not None else PRIOR_WEIGHT_MOE if self.prior_priced else PRIOR_WEIGHT
        return own.rates(prior, weight, unseen, reached=others.tried if unseen is not None else None)

    def record_step(self, seconds: float) -> None:
        self.model.costs.record(1, seconds)
        self.tokens += 1

    def record_verify(self, source: str, drafted: int, accepted: int, seconds: float) -> None:
        """A verify of ``drafted`` drafts (``seconds``: the verify alone, not the drafting)."""
        step = self.model.costs.step_s
        loss = 0.0
        if step:
            loss = (seconds + drafted * self.model.draft_s.get(source, 0.0)) / step - (accepted + 1)
            if self.budgeted or self.exploring:
                self.explore_loss += loss
        self.model.costs.record(drafted + 1, seconds)
        self.tokens += accepted + 1
        self._record_acceptance(source, drafted, accepted)
        if self.probing:
            # a probe that did not pay (where budgeted) or accepted nothing: wait twice as long
            # before the next. On the repeating prompt probes accepting 1 draft in 2 lost 0.2-0.5
            # steps each, and reset to the shortest wait they fired 10 times in 128 tokens
            wait = self._wait.get(source, self.reprobe)
            failed = loss > 0 if self.budgeted else accepted == 0
            self._wait[source] = min(wait * 2, self.max_wait) if failed else self.reprobe
            self.probing = False
        self.exploring = False

    def _tables(self, source: str) -> tuple[Acceptance, Acceptance]:
        """The request's and the model's acceptance tables of ``source``: an outcome goes to both."""
        return self.tables.setdefault(source, Acceptance()), self.model.table(source)

    def _record_acceptance(self, source: str, drafted: int, accepted: int) -> None:
        for table in self._tables(source):
            table.record(drafted, accepted)

    def shadow(self, source: str, draft: list[int], verified: int = 0) -> None:
        """A free draft of which a verify checks the first ``verified`` tokens (0: declined): score
        the rest against the tokens decided next (``observe``), so positions past the drafts
        verified are learnt too (a verify that accepted all of its 3 drafts says nothing of a 4th,
        and without this a position no verify reached kept its guess for good). Each chance's draft
        is scored (up to ``K_MAX`` at once): they overlap, as the drafts a verify would have run at
        those positions would have."""
        if len(draft) > verified and len(self._shadows) < K_MAX:
            self._shadows.append(Shadow(source, list(draft), verified))

    def observe(self, token: int) -> None:
        """A decided token (the next after those the pending shadowed drafts were proposed at)."""
        if not self._shadows:
            return
        pending = []
        for sh in self._shadows:
            # each position's outcome is recorded as soon as it is known: a draft that keeps being
            # right (a loop, a long quote) would otherwise teach nothing for up to 15 tokens
            ok = token == sh.draft[sh.matched]
            if sh.matched >= sh.verified:  # the verify records its own drafts' outcomes
                for table in self._tables(sh.source):
                    table.record_at(sh.matched, ok)
            sh.matched += ok
            if ok and sh.matched < len(sh.draft):
                pending.append(sh)
            else:
                self.shadowed += 1
        self._shadows = pending
