"""Admission: the one store round trip a request makes before dispatch.

The client's rate-limit tokens are taken and its budget hold placed by one atomic call
(StateStore.admit: one EVALSHA on Redis), which also carries the settles of the answers this
replica gave since its last call: one round trip per request in steady state, none after the
answer (a replica that goes quiet sends its last settles on their own, SETTLE_AFTER_S later). While the store is down each half
degrades on its own terms: rate limits to this replica's buckets, budgets to its local
approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.features import NO_BUDGET, BudgetState
from gateway.store.base import Admission, Hold, StateStore, StoreUnavailable
from gateway.store.budgets import Budgets
from gateway.store.limits import RateLimiter


@dataclass(frozen=True)
class Admitted:
    budget: BudgetState  # the decision's budget feature
    hold: Hold | None  # placed on the store: settle or release it; None when none was placed


NOTHING = Admitted(NO_BUDGET, None)


async def admit(store: StateStore, limits: RateLimiter | None, budgets: Budgets | None, client: str | None, *,
                tokens: int, prompt_tokens: int, max_tokens: int | None, pinned: str | None) -> Admitted:
    """Take the request's rate-limit tokens (or raise the 429) and hold its estimated maximum
    cost against the client's budget, in one store call."""
    buckets = limits.buckets(client, tokens) if limits is not None else []
    hold = budgets.hold(client, prompt_tokens, max_tokens, pinned) if budgets is not None else None
    if not buckets and hold is None:
        return NOTHING
    if hold is not None:
        assert budgets is not None
        await budgets.settled(hold)
    admission: Admission | None = None
    wait = 0.0
    try:
        if budgets is not None:  # the answers this replica settled since its last call go along
            admission = await budgets.carrying(lambda settles: store.admit(buckets, hold, settles))
        else:
            admission = await store.admit(buckets, hold)
        wait = admission.wait_s
        if limits is not None and buckets:
            limits.shared()
    except StoreUnavailable:
        if limits is not None and buckets:
            wait = limits.take_locally(buckets)
    if limits is not None:
        limits.check(client, wait)
    if hold is None or budgets is None:
        return NOTHING
    budget = budgets.state(client, hold, admission)
    # Held on the store only when the store placed it; the local approximation holds nothing.
    return Admitted(budget, hold if admission is not None and admission.held else None)
