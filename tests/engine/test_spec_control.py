"""``speculative: auto``'s choice of k (local_engine/spec_control.py): the decision rule as a pure
function of acceptance and measured costs, the cost curve's estimate, and the controller learning
from synthetic verifies (no clock: it is told the seconds)."""

from __future__ import annotations

import itertools

import pytest

from local_engine.spec_control import (
    K_MAX,
    OPTIMISTIC_ROW_STEPS,
    PRIOR_ROW_STEPS,
    Acceptance,
    ModelSpec,
    SpecController,
    VerifyCosts,
    best_k,
    best_positive_k,
    expected_tokens,
)

# the built-in model's measured verify cost in single steps at m rows (1 thread): the row tiles
# make it a staircase, 9 rows cost 1.26x 8 rows
CURVE = [0.0, 1.0, 1.76, 2.17, 2.43, 2.91, 3.10, 3.28, 3.45, 4.36, 4.37, 4.6, 4.86, 5.2, 5.5, 5.8, 6.11]


def test_expected_tokens_counts_accepted_drafts_and_the_decided_token() -> None:
    assert expected_tokens([1.0] * 5, 5) == 6.0  # all accepted + the token after them
    assert expected_tokens([0.0] * 5, 5) == 1.0  # the first rejected: its position's token only
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([0.5, 1.0, 1.0], 3) == pytest.approx(1 + 0.5 * 3)  # bimodal: all or nothing


def test_best_k_follows_acceptance_and_the_cost_curve() -> None:
    assert best_k([0.05] * K_MAX, CURVE, K_MAX) == 0  # open chat: a step is cheaper
    assert best_k([0.98] * K_MAX, CURVE, K_MAX) == 15  # a long quote: the most rows
    # a sure draft of 8: 8 drafts need 9 rows (4.36 steps), 7 need 8 (3.45): 8/3.45 > 9/4.36
    assert best_k([1.0] * 8 + [0.0] * 7, CURVE, 8) == 7
    # the same rates on a linear curve take the 8th
    linear = [0.0] + [1 + PRIOR_ROW_STEPS * (m - 1) for m in range(1, K_MAX + 2)]
    assert best_k([1.0] * 8 + [0.0] * 7, linear, 8) == 8
    assert best_k([0.98] * K_MAX, CURVE, 3) == 3  # no more than the source can give
    # bimodal acceptance (a wrong n-gram fails at once, a right one runs on): pays at 50% first
    assert best_k([0.5] + [0.97] * (K_MAX - 1), CURVE, K_MAX) == 7  # 8 rows: the cheap end of a tile
    assert best_k([0.5] * K_MAX, CURVE, K_MAX) == 0  # the same first rate, geometric: it does not


def test_best_k_counts_the_draft_cost_and_the_margin() -> None:
    accept = [0.95] * K_MAX
    assert best_k(accept, CURVE, K_MAX) == 7
    assert best_k(accept, CURVE, K_MAX, draft_s=0.3) == 7  # each draft token costs 0.3 step: still pays
    assert best_k(accept, CURVE, K_MAX, draft_s=0.5) == 0  # half a step a token: no longer
    assert best_k([0.8] * K_MAX, CURVE, K_MAX, draft_s=0.2) == 0 < best_k([0.8] * K_MAX, CURVE, K_MAX)
    # a k that only ties with a step is not taken when a margin is asked for
    tie = [0.0, 1.0, 1.5]
    assert best_k([0.5], tie, 1) == 0 and best_k([0.51], tie, 1) == 1
    assert best_k([0.51], tie, 1, margin=0.05) == 0
    assert best_positive_k([0.05] * K_MAX, CURVE, K_MAX) >= 1  # a probe drafts something


def test_cost_curve_uses_measured_sizes_and_fills_the_rest() -> None:
    c = VerifyCosts()
    c.record(1, 0.010)
    c.record(8, 0.035)
    curve = c.curve(K_MAX)
    assert len(curve) == K_MAX + 2 and curve[1] == 0.010 and curve[8] == 0.035
    assert curve[4] == pytest.approx(0.010 + OPTIMISTIC_ROW_STEPS * 0.010 * 3)  # optimistic: to be tried
    assert curve[12] == pytest.approx(0.035 + PRIOR_ROW_STEPS * 0.010 * 4)  # past the largest
    c.record(8, 0.055)  # a moving average, not the last figure; a slower sample moves it less
    assert 0.035 < c.curve(8)[8] < 0.035 + 0.25 * 0.020
    c.record(8, 0.025)
    assert c.curve(8)[8] == pytest.approx(0.75 * (0.9 * 0.035 + 0.1 * 0.055) + 0.25 * 0.025)
    c.record(4, 0.005)  # a size measured cheaper than a step (noise) still bounds the next
    assert c.curve(8)[5] >= c.curve(8)[4]
    c.record(6, 0.080)  # a spike on a rarely used size: never above a larger size's cost
    curve = c.curve(K_MAX)
    assert curve[6] == curve[7] == curve[8] and all(a <= b for a, b in itertools.pairwise(curve[2:]))


def test_acceptance_counts_per_position_and_untried_positions_follow_the_last() -> None:
    a = Acceptance()
    a.record(4, 4)  # all 4 accepted
    a.record(4, 1)  # the second rejected
    assert a.tried[:5] == [2, 2, 1, 1, 0] and a.accepted[:5] == [2, 1, 1, 1, 0]
    r = a.rates(weight=2.0)
    assert r[0] == pytest.approx((2 + 2 * 0.5) / 4)
    assert r[1] == pytest.approx((1 + 2 * r[0]) / 4)
    assert r[6] == pytest.approx(r[5]) == pytest.approx(r[4])  # no verify got there: as the last
    shrunk = Acceptance().rates(prior=[0.9] * K_MAX)
    assert shrunk == pytest.approx([0.9] * K_MAX)  # nothing of its own: the prior


def _chance(ctl: SpecController, source: str, accept_first: int, step_s: float = 0.010) -> int:
    """One decode chance with a draft of K_MAX available; drafts accept ``accept_first`` tokens."""
    k = ctl.choose(source, K_MAX, free=source.startswith("lookup"))
    if k == 0:
        ctl.record_step(step_s)
    else:
        ctl.record_verify(source, k, min(k, accept_first), CURVE[k + 1] * step_s)
    return k


def test_controller_grows_k_while_drafts_are_accepted() -> None:
    ctl = SpecController(ModelSpec())
    ks = [_chance(ctl, "lookup:3", K_MAX) for _ in range(12)]
    assert ks[:2] == [0, 0]  # single steps are measured first
    assert ks[2] > 0 and ks[2:6] == sorted(set(ks[2:6]))  # every fully accepted draft: a longer one
    # then the size with the most tokens per second on this curve: 8 rows (the end of a tile), not 9
    assert ks[-1] == 7
    # the model remembers: a later request on it starts long
    ctl2 = SpecController(ctl.model)
    assert ctl2.choose("lookup:3", K_MAX, free=True) >= 7


def test_controller_stops_drafting_where_nothing_is_accepted_and_reprobes_less_often() -> None:
    ctl = SpecController(ModelSpec(), reprobe=4, max_wait=32)
    ks = [_chance(ctl, "lookup:1", 0) for _ in range(200)]
    verifies = [i for i, k in enumerate(ks) if k > 0]
    assert 2 <= len(verifies) <= 12  # a few tries, then only probes
    gaps = [b - a for a, b in itertools.pairwise(verifies)]
    assert gaps[-1] >= 32 and gaps == sorted(gaps)  # probes back off, up to max_wait
    assert ctl.probes >= 3
    # a probe that accepts its drafts brings the next probe back to the shortest wait
    while (k := ctl.choose("lookup:1", K_MAX, free=True)) == 0:
        ctl.record_step(0.010)
    ctl.record_verify("lookup:1", k, k, CURVE[k + 1] * 0.010)
    ks = [_chance(ctl, "lookup:1", 0) for _ in range(10)]
    assert any(k > 0 for k in ks[:4])


def test_sources_learn_apart_and_a_costly_drafter_drafts_less() -> None:
    ms = ModelSpec()
    ctl = SpecController(ms)
    for _ in range(30):
        _chance(ctl, "lookup:3", K_MAX)
        _chance(ctl, "lookup:1", 0)
    assert ctl.choose("lookup:3", K_MAX, free=True) == 7
    assert ctl.choose("lookup:1", K_MAX, free=True) == 0
    for _ in range(3):
        ms.table("draft").record(8, 8)
    unmeasured = SpecController(ms).choose("draft", K_MAX)  # a quarter step a token until measured
    assert unmeasured > 0
    ms.record_draft("draft", 4, 0.004)  # a draft model at 0.1 step a token
    assert ms.draft_s["draft"] == pytest.approx(0.001)
    assert SpecController(ms).choose("draft", K_MAX) == 7
    ms.draft_s["draft"] = 0.008  # 0.8 step a token: drafting cannot pay
    assert SpecController(ms).choose("draft", K_MAX) == 0
    ms.draft_s["draft"] = 0.010  # the target itself as its draft: never
    assert SpecController(ms).choose("draft", K_MAX) == 0
    assert SpecController(ms).choose("lookup:3", K_MAX, free=True) == 7  # free drafts are not charged
