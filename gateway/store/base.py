"""The state backend seam: what the gateway asks of a shared store, and nothing more."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

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
