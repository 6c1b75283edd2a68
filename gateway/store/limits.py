"""Per-client rate limits (requests/min, tokens/min) as token buckets on the state store.

On Redis the buckets are shared by every replica and taken atomically (one Lua script), so the
fleet admits at most the limit. While the store is down each replica falls back to its own
in-memory buckets with the full limit: a local approximation that admits up to N x the limit
across N replicas until Redis is back, rather than refusing everyone or admitting without limit.
"""

from __future__ import annotations

import math
import time

import structlog

from gateway.policy.model import Client
from gateway.schema import APIError
from gateway.store.base import Bucket, StateStore, StoreUnavailable
from gateway.store.embedded import EmbeddedStore

log = structlog.get_logger("gateway.limits")

_MINUTE = 60.0


class RateLimiter:
    def __init__(self, clients: list[Client] | None, store: StateStore) -> None:
        self._clients = {c.name: c for c in clients or () if c.requests_per_min or c.tokens_per_min}
        self._store = store
        self._local = EmbeddedStore()
        self._degraded_since: float | None = None

    def __bool__(self) -> bool:
        return bool(self._clients)

    def buckets(self, client_name: str | None, tokens: int) -> list[Bucket]:
        """The buckets this request takes from: none for a client without limits."""
        client = self._clients.get(client_name or "")
        if client is None:
            return []
        out = []
        if client.requests_per_min:
            out.append(Bucket(f"rl:{client.name}:requests", client.requests_per_min, _MINUTE, 1))
        if client.tokens_per_min:
            out.append(Bucket(f"rl:{client.name}:tokens", client.tokens_per_min, _MINUTE, max(1, tokens)))
        return out

    def shared(self) -> None:
        """The store answered: limits are fleet-wide (again)."""
        if self._degraded_since is not None:
            log.info("rate_limits_shared_again", store=self._store.name)
            self._degraded_since = None

    def take_locally(self, buckets: list[Bucket]) -> float:
        """The store is down: this replica's own buckets, with the full limit."""
        if self._degraded_since is None:
            log.warning("rate_limits_local", store=self._store.name,
                        detail="shared store down: each replica limits on its own")
            self._degraded_since = time.monotonic()
        return self._local.take_now(buckets)

    def check(self, client_name: str | None, wait: float) -> None:
        """A 429 with Retry-After when the buckets could not give."""
        client = self._clients.get(client_name or "")
        if client is None or wait <= 0:
            return
        raise APIError(
            429,
            f"Rate limit exceeded for client {client.name!r} "
            f"({_describe(client)}); retry after {math.ceil(wait)} s.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    async def admit(self, client_name: str | None, tokens: int) -> None:
        """Take this request from the client's buckets, or raise a 429 with Retry-After."""
        buckets = self.buckets(client_name, tokens)
        if not buckets:
            return
        try:
            wait = await self._store.take(buckets)
            self.shared()
        except StoreUnavailable:
            wait = self.take_locally(buckets)
        self.check(client_name, wait)


def _describe(client: Client) -> str:
    parts = []
    if client.requests_per_min:
        parts.append(f"{client.requests_per_min} requests/min")
    if client.tokens_per_min:
        parts.append(f"{client.tokens_per_min} tokens/min")
    return ", ".join(parts)
