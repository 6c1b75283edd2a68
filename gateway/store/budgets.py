"""Per-client usage and spend budgets on the state store.

Each client's usage this period (requests, tokens, USD at the targets' `prices`) is one hash of
counters, keyed by the period (`usage:<client>:day:2026-12-04`): every replica adds to it with one
atomic script on Redis (HINCRBYFLOAT), so the fleet's total is exact, and it expires when its
period is over. Before the decision a replica reads the client's spend (`state`, a feature);
after the answer it adds what the answer cost (`charge`, off the answer's path: the answer does
not wait for the store, but this replica's next read of that client's spend waits for the add).
A budget is checked, not reserved: the requests already in flight when the last dollar goes are
still charged, so the overshoot is at most what those cost (one request per replica when each
replica has one in flight).

While the store is down, each replica goes on from the spend it last read plus what it charged
since, in its own memory: a local approximation (N replicas may each spend the rest once); the
charges made meanwhile are not added to the shared total when the store is back.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from gateway.features import NO_BUDGET, BudgetState
from gateway.policy.model import Client, Policy
from gateway.store.base import StateStore, StoreUnavailable
from gateway.store.embedded import EmbeddedStore

log = structlog.get_logger("gateway.budgets")

_DEFAULT_PERIOD = "day"  # how usage is counted for a client without a budget


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


class Budgets:
    def __init__(self, policy: Policy, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self._policy = policy
        self._clients: dict[str, Client] = {c.name: c for c in policy.clients or ()}
        self._store = store
        self._clock = clock
        self._local = EmbeddedStore()
        self._last_shared: dict[str, float] = {}  # key -> the spend last read from the store
        self._degraded = False
        self._pending: dict[str, set[asyncio.Task[None]]] = {}  # key -> its adds not yet done

    def __bool__(self) -> bool:
        return bool(self._clients)

    def _period(self, client: Client, now: float) -> Period:
        return Period.at(client.budget.period if client.budget else _DEFAULT_PERIOD, now)

    @staticmethod
    def _key(client: Client, period: Period) -> str:
        return f"usage:{client.name}:{period.name}:{period.label}"

    def has_budget(self, client_name: str | None) -> bool:
        client = self._clients.get(client_name or "")
        return client is not None and client.budget is not None

    async def _read(self, key: str) -> dict[str, float]:
        if pending := self._pending.get(key):  # this replica's own charges land before it reads
            await asyncio.wait(set(pending))
        try:
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

    async def state(self, client_name: str | None) -> BudgetState:
        """The client's spend against its budget now: a feature for the decision."""
        client = self._clients.get(client_name or "")
        if client is None or client.budget is None:
            return NO_BUDGET
        now = self._clock()
        period = self._period(client, now)
        counters = await self._read(self._key(client, period))
        return BudgetState(spent_usd=counters.get("usd", 0.0), limit_usd=client.budget.usd, period=period.name,
                           resets_in_s=period.left_s(now))

    def cost(self, charge: Charge) -> float:
        prices = self._policy.prices(charge.target)
        return prices.cost(charge.prompt_tokens, charge.completion_tokens) if prices is not None else 0.0

    async def charge(self, client_name: str | None, charges: list[Charge]) -> None:
        """Add one answer's usage and cost to the client's counters for this period."""
        client = self._clients.get(client_name or "")
        if client is None or not charges:
            return
        now = self._clock()
        period = self._period(client, now)
        amounts: dict[str, float] = {"requests": 1, "estimated": int(any(c.estimated for c in charges))}
        for c in charges:
            usd = self.cost(c)
            for name, value in (("prompt_tokens", c.prompt_tokens), ("completion_tokens", c.completion_tokens),
                                ("usd", usd), (f"usd:{c.target}", usd),
                                (f"tokens:{c.target}", c.prompt_tokens + c.completion_tokens)):
                amounts[name] = amounts.get(name, 0.0) + value
        key = self._key(client, period)
        ttl = period.left_s(now) + 60  # kept a minute past its period, for a late report
        task = asyncio.create_task(self._add(key, amounts, ttl))
        pending = self._pending.setdefault(key, set())
        pending.add(task)
        task.add_done_callback(lambda t: self._done(key, t))

    def _done(self, key: str, task: asyncio.Task[None]) -> None:
        pending = self._pending.get(key)
        if pending is not None:
            pending.discard(task)
            if not pending:
                del self._pending[key]

    async def _add(self, key: str, amounts: dict[str, float], ttl: float) -> None:
        try:
            await self._store.add(key, amounts, ttl)
            self._up()
            # Should the store go down before the next read, the local approximation starts here.
            self._last_shared[key] = self._last_shared.get(key, 0.0) + amounts["usd"]
        except StoreUnavailable:
            self._down()
            self._local.add_now(key, amounts, ttl)
        except Exception as exc:  # counting must never take the loop down
            log.error("usage_charge_failed", error=type(exc).__name__)

    async def drain(self) -> None:
        """Wait for every charge still on its way to the store (at shutdown)."""
        tasks = {t for pending in self._pending.values() for t in pending}
        if tasks:
            await asyncio.wait(tasks, timeout=5)

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
            "budget_usd": budget.usd if budget else None,
            "remaining_usd": round(max(0.0, budget.usd - spent), 6) if budget else None,
            "status": ("exceeded" if spent >= budget.usd else "ok") if budget else None,
            "by_target": by_target,
            "shared": self._store.shared and not self._degraded,
        }

    async def all_usage(self) -> dict[str, Any]:
        return {"object": "list", "data": [await self.usage(name) for name in self._clients]}
