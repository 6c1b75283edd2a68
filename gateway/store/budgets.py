"""Per-client usage and spend budgets on the state store: held before dispatch, settled after.

Each client's usage this period (requests, tokens, USD at the targets' `prices`) is one hash of
counters, keyed by the period (`usage:<client>:day:2026-12-04`), expiring when its period is over.
Before the decision, in the same store call that takes the rate-limit tokens (gateway/store/
admission.py), a request *holds* its estimated maximum cost (its prompt and max_tokens, or the
budget's hold_tokens, at the priced targets' prices) if that fits beside the spend and the holds
of the requests in flight on every replica; if not, its budget state is `exceeded` (a 429, or a
`budget: exceeded` rule). After the answer it *settles*: the hold is released and the actual cost
added, in one atomic script, once per request (a settle id the store remembers), off the answer's
path (a task; this replica's next admit for the client waits for it). So the fleet cannot spend
past the budget except by what answers cost beyond their hold (a prompt longer than ~4
characters a token, an answer with no max_tokens longer than hold_tokens). A hold whose request
never settles (its replica died) lapses after the request timeout.

While the store is down, each replica goes on from the spend it last read plus what it charged
since, in its own memory: a local approximation (N replicas may each spend the rest once),
checked against each request's hold but not holding. The settles that failed meanwhile are kept
and replayed, in order, once the store answers again: counted once each on the shared total.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from gateway.features import BUDGET_SLACK_USD, BudgetState
from gateway.policy.model import Client, Policy
from gateway.store.base import Admission, Hold, Settle, StateStore, StoreUnavailable, fits
from gateway.store.embedded import EmbeddedStore

log = structlog.get_logger("gateway.budgets")

_DEFAULT_PERIOD = "day"  # how usage is counted for a client without a budget

# An answer's settle waits this long for its replica's next admit to carry it (one store round
# trip per request in steady state) before it is sent on its own: quiet traffic settles promptly
# all the same, and a hold outlives its answer by this much at most.
SETTLE_AFTER_S = 0.05

T = TypeVar("T")


@dataclass(frozen=True)
class Charge:
    """One target's share of an answer. `estimated`: the target reported no usage (a stream cut
    or ended without it) and the counts are the gateway's ~4 characters a token."""

    target: str
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


@dataclass(frozen=True)
class Period:
    name: str
    label: str  # e.g. 2026-12-04 for a day
    start: datetime
    end: datetime

    @classmethod
    def at(cls, name: str, now: float) -> Period:
        t = datetime.fromtimestamp(now, UTC)
        if name == "hour":
            start = t.replace(minute=0, second=0, microsecond=0)
            return cls(name, start.strftime("%Y-%m-%dT%H"), start, start + timedelta(hours=1))
        day = t.replace(hour=0, minute=0, second=0, microsecond=0)
        if name == "day":
            return cls(name, day.strftime("%Y-%m-%d"), day, day + timedelta(days=1))
        if name == "week":
            start = day - timedelta(days=day.weekday())
            return cls(name, start.strftime("%G-W%V"), start, start + timedelta(days=7))
        start = day.replace(day=1)
        days = calendar.monthrange(start.year, start.month)[1]
        return cls(name, start.strftime("%Y-%m"), start, start + timedelta(days=days))

    def left_s(self, now: float) -> float:
        return max(0.0, self.end.timestamp() - now)


# A hold outlives its request's timeout by this much before it lapses (a replica that died).
_HOLD_MARGIN_S = 30.0


class Budgets:
    def __init__(self, policy: Policy, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self._policy = policy
        self._clients: dict[str, Client] = {c.name: c for c in policy.clients or ()}
        self._store = store
        self._clock = clock
        self._local = EmbeddedStore()
        self._last_shared: dict[str, float] = {}  # key -> the spend last read from the store
        self._degraded = False
        # Answers since the last store call, each with when it was queued: the next admit carries them.
        self._queued: list[tuple[float, Settle]] = []
        self._pending: dict[str, set[asyncio.Future[None]]] = {}  # key -> calls carrying its settles
        self._backlog: list[Settle] = []  # settles the store could not take: replayed when it is back
        self._replaying: asyncio.Task[None] | None = None
        self._replay_lock = asyncio.Lock()  # one replay at a time: each settle leaves the backlog once
        self._timer: asyncio.TimerHandle | None = None  # sends what no admit carried in SETTLE_AFTER_S
        self._flushes: set[asyncio.Task[None]] = set()
        priced = [p for p in map(policy.prices, policy.targets) if p is not None]
        self._dearest = (max((p.input for p in priced), default=0.0), max((p.output for p in priced), default=0.0))

    def __bool__(self) -> bool:
        return bool(self._clients)

    def carry_over(self, previous: Budgets) -> None:
        """A policy reload on the same store: what the previous runtime's budgets still owe the
        store (settles queued, on their way, to replay) and its local approximation go on here."""
        self._local, self._last_shared, self._degraded = previous._local, previous._last_shared, previous._degraded
        self._pending, self._backlog, self._replay_lock = previous._pending, previous._backlog, previous._replay_lock
        self._queued = previous._queued  # the previous timer, if set, flushes this same list

    def _period(self, client: Client, now: float) -> Period:
        return Period.at(client.budget.period if client.budget else _DEFAULT_PERIOD, now)

    @staticmethod
    def _key(client: Client, period: Period) -> str:
        return f"usage:{client.name}:{period.name}:{period.label}"

    def has_budget(self, client_name: str | None) -> bool:
        client = self._clients.get(client_name or "")
        return client is not None and client.budget is not None

    # -- before dispatch ----------------------------------------------------------------------
    def max_cost(self, client: Client, prompt_tokens: int, max_tokens: int | None, pinned: str | None) -> float:
        """The most this request may cost: its prompt and max_tokens (or the budget's
        hold_tokens) at the pinned target's prices, or at the dearest priced target's."""
        completion = max_tokens if max_tokens is not None else (client.budget.hold_tokens if client.budget else 0)
        prices = self._policy.prices(pinned) if pinned is not None else None
        usd_in, usd_out = (prices.input, prices.output) if prices is not None else (
            (0.0, 0.0) if pinned is not None else self._dearest)
        return (prompt_tokens * usd_in + completion * usd_out) / 1_000_000

    def hold(self, client_name: str | None, prompt_tokens: int, max_tokens: int | None,
             pinned: str | None) -> Hold | None:
        """This request's hold on its client's budget (None: the client has no budget)."""
        client = self._clients.get(client_name or "")
        if client is None or client.budget is None:
            return None
        now = self._clock()
        period = self._period(client, now)
        return Hold(key=self._key(client, period), id=secrets.token_hex(12),
                    usd=self.max_cost(client, prompt_tokens, max_tokens, pinned), limit_usd=client.budget.usd,
                    ttl_s=period.left_s(now) + 60, lapse_s=self._policy.limits.request_timeout_s + _HOLD_MARGIN_S)

    async def settled(self, hold: Hold) -> None:
        """Wait for the store calls carrying this replica's settles of the hold's client (they
        land before it admits again, so one replica's sequential requests see each other's cost;
        those still queued go with the admit itself, applied before its hold)."""
        if pending := self._pending.get(hold.key):
            await asyncio.wait(set(pending))

    async def carrying(self, call: Callable[[Sequence[Settle]], Awaitable[T]]) -> T:
        """Make a store call that carries every settle queued on this replica, each once: applied
        with the call, or, if it fails, counted locally and replayed when the store is back (a
        call that failed after the store applied it is replayed too: the settle id counts once)."""
        batch, self._queued[:] = [s for _, s in self._queued], []
        if not batch:
            return await call(())
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = {s.key for s in batch}
        for key in keys:
            self._pending.setdefault(key, set()).add(sent)
        try:
            result = await call(batch)
        except StoreUnavailable:
            self._down()
            self._missed(batch)
            raise
        except BaseException:  # cancelled mid-call (its client left): applied or not, replayed once
            self._missed(batch)
            raise
        finally:
            sent.set_result(None)
            for key in keys:
                self._done(key, sent)
        self._up()
        for s in batch:  # should the store go down before the next read, the local approximation starts here
            self._last_shared[s.key] = self._last_shared.get(s.key, 0.0) + s.amounts.get("usd", 0.0)
        return result

    def _missed(self, batch: list[Settle]) -> None:
        for s in batch:
            self._local.add_now(s.key, s.amounts, s.ttl_s)
        self._backlog.extend(batch)

    def _done(self, key: str, sent: asyncio.Future[None]) -> None:
        pending = self._pending.get(key)
        if pending is not None:
            pending.discard(sent)
            if not pending:
                del self._pending[key]

    async def flush(self) -> None:
        """Send the settles no admit has carried yet, on their own (one round trip for them all);
        if the store is down they go to the backlog."""
        if self._queued:
            with contextlib.suppress(StoreUnavailable):
                await self.carrying(lambda settles: self._store.admit([], None, settles))

    def _flush_later(self) -> None:
        # Only settles no admit has carried for SETTLE_AFTER_S go on their own: under steady
        # traffic the timer finds them carried already and waits for the oldest left.
        self._timer = None
        if not self._queued:
            return
        wait = self._queued[0][0] + SETTLE_AFTER_S - time.monotonic()
        if wait > 0:
            self._timer = asyncio.get_running_loop().call_later(wait, self._flush_later)
        else:
            task = asyncio.ensure_future(self._flush_logged())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # counting must never take the loop down
            log.error("usage_charge_failed", error=type(exc).__name__)

    def state(self, client_name: str | None, hold: Hold, admission: Admission | None) -> BudgetState:
        """The budget feature from what the store's admit found, or (`admission` None: the store
        is down) from this replica's local approximation."""
        client = self._clients[client_name or ""]
        assert client.budget is not None
        now = self._clock()
        period = self._period(client, now)
        if admission is None:
            self._down()
            spent = self._last_shared.get(hold.key, 0.0) + self._local.counters_now(hold.key).get("usd", 0.0)
            admission = Admission(spent_usd=spent, held=fits(spent, 0.0, hold.usd, hold.limit_usd))
        else:
            self._up()
            self._last_shared[hold.key] = admission.spent_usd
        return BudgetState(spent_usd=admission.spent_usd, limit_usd=client.budget.usd, period=period.name,
                           resets_in_s=period.left_s(now), held_usd=admission.held_usd, hold_usd=hold.usd,
                           fits=admission.held)

    # -- reading --------------------------------------------------------------------------------
    async def _read(self, key: str) -> dict[str, float]:
        await self.flush()  # this replica's own settles land before it reads
        if pending := self._pending.get(key):
            await asyncio.wait(set(pending))
        try:
            await self._replay()
            counters = await self._store.counters(key)
        except StoreUnavailable:
            self._down()
            local = self._local.counters_now(key)
            spent = self._last_shared.get(key, 0.0) + local.get("usd", 0.0)
            return {**local, "usd": spent}
        self._up()
        self._last_shared[key] = counters.get("usd", 0.0)
        return counters

    def _down(self) -> None:
        if not self._degraded:
            log.warning("budgets_local", store=self._store.name,
                        detail="shared store down: each replica counts spend on its own")
            self._degraded = True

    def _up(self) -> None:
        if self._degraded:
            log.info("budgets_shared_again", store=self._store.name)
            self._degraded = False
        if self._backlog and self._replaying is None:
            self._replaying = asyncio.ensure_future(self._replay())
            self._replaying.add_done_callback(lambda _: setattr(self, "_replaying", None))

    def cost(self, charge: Charge) -> float:
        prices = self._policy.prices(charge.target)
        return prices.cost(charge.prompt_tokens, charge.completion_tokens) if prices is not None else 0.0

    # -- after the answer -----------------------------------------------------------------------
    def charge(self, client_name: str | None, hold: Hold | None, charges: list[Charge]) -> None:
        """Settle one answer: its hold released, its usage and cost added to the client's counters
        for this period, exactly once, off the answer's path: queued for this replica's next admit
        to carry, or sent on its own after SETTLE_AFTER_S."""
        client = self._clients.get(client_name or "")
        if client is None:
            return
        amounts: dict[str, float] = {}
        if charges:
            amounts = {"requests": 1, "estimated": int(any(c.estimated for c in charges))}
            for c in charges:
                usd = self.cost(c)
                for name, value in (("prompt_tokens", c.prompt_tokens), ("completion_tokens", c.completion_tokens),
                                    ("usd", usd), (f"usd:{c.target}", usd),
                                    (f"tokens:{c.target}", c.prompt_tokens + c.completion_tokens)):
                    amounts[name] = amounts.get(name, 0.0) + value
        elif hold is None:
            return  # nothing to count and nothing to release
        if hold is not None:
            key, ttl = hold.key, hold.ttl_s
        else:
            now = self._clock()
            period = self._period(client, now)
            key, ttl = self._key(client, period), period.left_s(now) + 60  # a minute past its period
        self._queued.append((time.monotonic(),
                             Settle(key, hold.id if hold is not None else secrets.token_hex(12), amounts, ttl)))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SETTLE_AFTER_S, self._flush_later)

    def release(self, hold: Hold | None, client_name: str | None) -> None:
        """A held request that ends without an answer (refused, failed, deferred): its hold goes."""
        if hold is not None:
            self.charge(client_name, hold, [])

    async def _replay(self) -> None:
        """The settles the store missed, oldest first, each once (its settle id); raises
        StoreUnavailable, keeping the rest, if the store is still down."""
        if not self._backlog:
            return
        async with self._replay_lock:
            while self._backlog:
                settle = self._backlog[0]
                await self._store.settle(settle.key, settle.id, settle.amounts, settle.ttl_s)
                self._backlog.pop(0)
                # Now on the shared total: out of this replica's local approximation.
                self._local.add_now(settle.key, {k: -v for k, v in settle.amounts.items()}, settle.ttl_s)
                log.info("usage_replayed", backlog=len(self._backlog))

    async def drain(self) -> None:
        """Send every settle still queued or on its way to the store (at shutdown), and replay
        what the store missed if it answers now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.flush()
        sent = {f for pending in self._pending.values() for f in pending}
        if sent:
            await asyncio.wait(sent, timeout=5)
        try:
            async with asyncio.timeout(5):
                await self._replay()
        except (StoreUnavailable, TimeoutError):
            if self._backlog:
                log.error("usage_not_replayed", settles=len(self._backlog),
                          detail="the store stayed down until shutdown: these answers are not on the shared total")

    async def usage(self, client_name: str) -> dict[str, Any]:
        """The client's usage this period, as GET /v1/usage reports it."""
        client = self._clients[client_name]
        now = self._clock()
        period = self._period(client, now)
        counters = await self._read(self._key(client, period))
        spent = counters.get("usd", 0.0)
        by_target = {
            name.removeprefix("usd:"): {"usd": round(value, 6),
                                        "tokens": int(counters.get("tokens:" + name.removeprefix("usd:"), 0))}
            for name, value in sorted(counters.items()) if name.startswith("usd:")
        }
        budget = client.budget
        return {
            "object": "usage",
            "client": client.name,
            "period": {"name": period.name, "label": period.label, "start": period.start.isoformat(),
                       "end": period.end.isoformat(), "resets_in_s": round(period.left_s(now), 1)},
            "requests": int(counters.get("requests", 0)),
            "prompt_tokens": int(counters.get("prompt_tokens", 0)),
            "completion_tokens": int(counters.get("completion_tokens", 0)),
            "estimated_requests": int(counters.get("estimated", 0)),
            "spent_usd": round(spent, 6),
            "held_usd": round(max(0.0, counters.get("held", 0.0)), 6),
            "budget_usd": budget.usd if budget else None,
            "remaining_usd": round(max(0.0, budget.usd - spent), 6) if budget else None,
            "status": ("exceeded" if spent >= budget.usd - BUDGET_SLACK_USD else "ok") if budget else None,
            "by_target": by_target,
            "shared": self._store.shared and not self._degraded,
        }

    async def all_usage(self) -> dict[str, Any]:
        return {"object": "list", "data": [await self.usage(name) for name in self._clients]}
