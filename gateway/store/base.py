"""The state backend seam: what the gateway asks of a shared store, and nothing more."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from gateway.features import BUDGET_SLACK_USD

Handler = Callable[[bytes], Awaitable[None]]


class StoreUnavailable(Exception):
    """The store could not answer in time (down, unreachable, timed out). Callers degrade:
    vault users fail closed, rate limits fall back to a local approximation."""


@dataclass(frozen=True)
class Bucket:
    """A token bucket: `capacity` tokens, refilled at `capacity / period_s` per second."""

    key: str
    capacity: float
    period_s: float
    cost: float

    @property
    def rate(self) -> float:
        return self.capacity / self.period_s


# A settled request's id is remembered this long, so a settle retried after an ambiguous failure
# (a timeout after Redis applied it) counts once. Kept short: one small key per request.
SETTLED_MEMORY_S = 600.0


@dataclass(frozen=True)
class Hold:
    """A request's estimated maximum cost, reserved against its client's budget before dispatch
    and released when the request settles with what it actually cost."""

    key: str  # the client's counters for this period
    id: str  # unique per request (made by the gateway: a client's x-request-id may repeat)
    usd: float
    limit_usd: float
    ttl_s: float  # the counters' lifetime: the rest of their period, and a minute
    lapse_s: float  # a hold never settled (its replica died mid-request) lapses after this


@dataclass(frozen=True)
class Settle:
    """An answered (or abandoned) request's account: its hold `id` released and `amounts` added
    to the counters of hash `key` (which then expire `ttl_s` from now), once per `id`."""

    key: str
    id: str
    amounts: Mapping[str, float]
    ttl_s: float


@dataclass(frozen=True)
class Admission:
    """What one admit call found: the rate limits' verdict and, with a hold, the client's spend."""

    wait_s: float = 0.0  # > 0: a rate limit refused the request; nothing was taken or held
    spent_usd: float = 0.0  # settled spend this period
    held_usd: float = 0.0  # reserved by requests in flight, this one's included when held
    held: bool = False  # this request's hold was placed


def fits(spent: float, held: float, usd: float, limit: float) -> bool:
    """Whether a hold of `usd` fits the budget beside what is spent and held."""
    return spent < limit - BUDGET_SLACK_USD and spent + held + usd <= limit + BUDGET_SLACK_USD


class StateStore(ABC):
    """Key/value with TTLs, atomic token buckets, and publish/subscribe.

    Every method either answers within the store's bounded timeout or raises StoreUnavailable:
    a request never hangs on the store."""

    name: str
    shared: bool  # whether other replicas see what this one writes

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store `value`, expiring `ttl_s` seconds from now (the store enforces the TTL)."""

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    async def take(self, buckets: list[Bucket]) -> float:
        """Atomically take `cost` from every bucket, or from none: 0.0 when taken, else the
        seconds until all of them could be taken."""

    @abstractmethod
    async def admit(self, buckets: list[Bucket], hold: Hold | None, settles: Sequence[Settle] = ()) -> Admission:
        """One atomic step before dispatch: apply `settles` (this replica's answers since its
        last call, each once: see `settle`), take `cost` from every bucket (or from none), and
        when they gave, place `hold` if it fits the budget beside the spend and the other holds
        (holds past their `lapse_s` are dropped first). With no buckets and no hold it only
        applies the settles: one round trip for a batch of them."""

    @abstractmethod
    async def settle(self, key: str, settle_id: str, amounts: Mapping[str, float], ttl_s: float) -> bool:
        """Release the hold `settle_id` (if any) and add `amounts` to the counters of hash `key`,
        once per `settle_id` (remembered SETTLED_MEMORY_S): False when it was already settled."""

    @abstractmethod
    async def add(self, key: str, amounts: Mapping[str, float], ttl_s: float) -> None:
        """Atomically add `amounts` to the counters of hash `key` (created at 0), which expires
        `ttl_s` seconds from now: usage and spend, counted exactly by every replica at once."""

    @abstractmethod
    async def counters(self, key: str) -> dict[str, float]:
        """The counters of hash `key` ({} when absent or expired)."""

    @abstractmethod
    async def publish(self, channel: str, message: bytes) -> None: ...

    @abstractmethod
    def subscribe(self, channel: str, handler: Handler) -> None:
        """Call `handler` with every message published on `channel` (by any replica, this one
        included) from now on; the subscription survives store outages. Needs a running loop."""

    @abstractmethod
    async def aclose(self) -> None: ...
