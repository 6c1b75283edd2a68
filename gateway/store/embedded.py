"""The default store: this process's memory. One replica needs nothing else; nothing survives a
restart (vaults and rate-limit buckets are short-lived by design)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from gateway.store.base import SETTLED_MEMORY_S, Admission, Bucket, Handler, Hold, Settle, StateStore, fits

log = structlog.get_logger("gateway.store")


class EmbeddedStore(StateStore):
    name = "embedded"
    shared = False

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max = max_keys
        self._lock = threading.Lock()
        self._values: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires at)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._counters: dict[str, tuple[dict[str, float], float]] = {}  # key -> (counters, expires at)
        self._holds: dict[str, dict[str, tuple[float, float]]] = {}  # counters key -> id -> (usd, lapses at)
        self._settled: dict[str, float] = {}  # settle id -> forgotten at
        self._handlers: dict[str, list[Handler]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._values.get(key)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._values[key]
                return None
            return entry[0]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        now = self._clock()
        with self._lock:
            self._values.pop(key, None)
            self._values[key] = (value, now + ttl_s)
            if len(self._values) > self._max:
                self._evict(now)

    def _evict(self, now: float) -> None:
        # Expired first, then the oldest written (dicts keep insertion order; set() re-inserts).
        for k in [k for k, (_, exp) in self._values.items() if exp <= now]:
            del self._values[k]
        while len(self._values) > self._max:
            del self._values[next(iter(self._values))]

    async def delete(self, key: str) -> None:
        with self._lock:
            self._values.pop(key, None)

    async def take(self, buckets: list[Bucket]) -> float:
        return self.take_now(buckets)

    def take_now(self, buckets: list[Bucket]) -> float:
        now = self._clock()
        with self._lock:
            levels = []
            wait = 0.0
            for b in buckets:
                tokens, last = self._buckets.get(b.key, (b.capacity, now))
                tokens = min(b.capacity, tokens + max(0.0, now - last) * b.rate)
                cost = min(b.cost, b.capacity)  # a request larger than the bucket empties it
                levels.append(tokens)
                if tokens < cost:
                    wait = max(wait, (cost - tokens) / b.rate)
            for b, tokens in zip(buckets, levels, strict=True):
                self._buckets[b.key] = (tokens - min(b.cost, b.capacity) if wait == 0.0 else tokens, now)
            return wait

    async def admit(self, buckets: list[Bucket], hold: Hold | None, settles: Sequence[Settle] = ()) -> Admission:
        for s in settles:
            self.settle_now(s.key, s.id, s.amounts, s.ttl_s)
        wait = self.take_now(buckets)
        if wait > 0 or hold is None:
            return Admission(wait_s=wait)
        now = self._clock()
        with self._lock:
            holds = self._holds.setdefault(hold.key, {})
            for old in [h for h, (_, lapses) in holds.items() if lapses <= now]:
                del holds[old]  # its request never settled
            counters, expires = self._counters.get(hold.key, ({}, now))
            spent = counters.get("usd", 0.0) if expires > now else 0.0
            held = sum(usd for usd, _ in holds.values())
            if not fits(spent, held, hold.usd, hold.limit_usd):
                return Admission(spent_usd=spent, held_usd=held)
            holds[hold.id] = (hold.usd, now + hold.lapse_s)
            return Admission(spent_usd=spent, held_usd=held + hold.usd, held=True)

    async def settle(self, key: str, settle_id: str, amounts: Mapping[str, float], ttl_s: float) -> bool:
        return self.settle_now(key, settle_id, amounts, ttl_s)

    def settle_now(self, key: str, settle_id: str, amounts: Mapping[str, float], ttl_s: float) -> bool:
        now = self._clock()
        with self._lock:
            if self._settled.get(settle_id, 0.0) > now:
                return False
            self._settled[settle_id] = now + SETTLED_MEMORY_S
            if len(self._settled) > self._max:
                for k in [k for k, until in self._settled.items() if until <= now]:
                    del self._settled[k]
            holds = self._holds.get(key)
            if holds is not None:
                holds.pop(settle_id, None)
                if not holds:
                    del self._holds[key]
            self._add_locked(key, amounts, ttl_s, now)
        return True

    async def add(self, key: str, amounts: Mapping[str, float], ttl_s: float) -> None:
        self.add_now(key, amounts, ttl_s)

    def add_now(self, key: str, amounts: Mapping[str, float], ttl_s: float) -> None:
        with self._lock:
            self._add_locked(key, amounts, ttl_s, self._clock())

    def _add_locked(self, key: str, amounts: Mapping[str, float], ttl_s: float, now: float) -> None:
        counters, expires = self._counters.get(key, ({}, now))
        if expires <= now:
            counters = {}
        for name, value in amounts.items():
            counters[name] = counters.get(name, 0.0) + value
        self._counters[key] = (counters, now + ttl_s)
        if len(self._counters) > self._max:  # periods past: expired first
            for k in [k for k, (_, exp) in self._counters.items() if exp <= now]:
                del self._counters[k]

    async def counters(self, key: str) -> dict[str, float]:
        return self.counters_now(key)

    def counters_now(self, key: str) -> dict[str, float]:
        with self._lock:
            entry = self._counters.get(key)
            now = self._clock()
            holds = [usd for usd, lapses in self._holds.get(key, {}).values() if lapses > now]
            counters = dict(entry[0]) if entry is not None and entry[1] > now else {}
            if holds:
                counters["held"] = sum(holds)
            return counters

    async def publish(self, channel: str, message: bytes) -> None:
        for handler in list(self._handlers.get(channel, ())):
            task = asyncio.create_task(self._deliver(handler, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _deliver(handler: Handler, message: bytes) -> None:
        try:
            await handler(message)
        except Exception as exc:  # a bad handler must not break publishing
            log.error("store_handler_failed", error=type(exc).__name__)

    def subscribe(self, channel: str, handler: Handler) -> None:
        self._handlers.setdefault(channel, []).append(handler)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
