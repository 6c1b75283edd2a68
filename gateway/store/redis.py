"""The shared store on Redis (redis-py's asyncio client), for several replicas.

Coordination is Redis's own: TTLs on keys, Lua scripts called by EVALSHA (one before dispatch
applies the settles this replica owes, once per request, then takes the rate-limit tokens and
places the budget hold; the same script with no request flushes settles on their own), pub/sub
for fleet-wide switches. Every call has a bounded socket timeout; after a failure the store answers
StoreUnavailable at once for `cooldown_s`, so an outage costs requests no waiting, and it tries
Redis again after that, so the state returns when Redis does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.features import BUDGET_SLACK_USD
from gateway.store.base import (
    SETTLED_MEMORY_S,
    Admission,
    Bucket,
    Handler,
    Hold,
    Settle,
    StateStore,
    StoreUnavailable,
)

log = structlog.get_logger("gateway.store")

# A request's settle, shared by both scripts below: once per id (its marker remembers it
# SETTLED_MEMORY_S), the hold, if still there, released as the actual cost is added.
_SETTLE_FN = """
local function settle(usage, holds, marker, id, ttl, first, last)
  if not redis.call('SET', marker, '1', 'NX', 'PX', MEMORY) then return 0 end
  local amount = redis.call('HGET', usage, 'hold:' .. id)
  if amount then
    redis.call('HDEL', usage, 'hold:' .. id)
    redis.call('HINCRBYFLOAT', usage, 'held', -tonumber(amount))
    redis.call('ZREM', holds, id)
  end
  for i = first, last, 2 do
    redis.call('HINCRBYFLOAT', usage, ARGV[i], ARGV[i + 1])
  end
  redis.call('PEXPIRE', usage, ttl)
  return 1
end
""".replace("MEMORY", str(int(SETTLED_MEMORY_S * 1000)))

# The one round trip a request makes before dispatch. It first applies the settles this replica
# owes (answers given since its last call: piggybacked here, so a request costs one round trip in
# steady state), then takes the rate-limit tokens and places the budget hold. KEYS: one hash per
# bucket; three per settle (the counters, their holds, the settled marker); then (with a hold) the
# client's counters and its holds (a sorted set: hold id -> when it lapses). ARGV: the number of
# buckets and of settles; capacity, rate (tokens/s) and cost for each bucket; for each settle its
# id, the counters' ttl (ms), its number of fields, then field, amount pairs; then (with a hold)
# its id, usd, limit, the counters' ttl (ms) and its lapse (s). Returns {wait, spent, held,
# placed}: wait "0" when every bucket gave its cost (else nothing was taken or held; the settles
# are applied either way). Timed by the server's clock, so replicas' clocks do not matter.
_ADMIT = _SETTLE_FN + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local a = 3 * n + 3
for j = 1, m do
  local k = n + 3 * j
  local fields = tonumber(ARGV[a + 2])
  settle(KEYS[k - 2], KEYS[k - 1], KEYS[k], ARGV[a], ARGV[a + 1], a + 3, a + 2 * fields + 1)
  a = a + 3 + 2 * fields
end
local levels = {}
local wait = 0
for i = 1, n do
  local cap = tonumber(ARGV[3 * i])
  local rate = tonumber(ARGV[3 * i + 1])
  local cost = math.min(tonumber(ARGV[3 * i + 2]), cap)
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or cap
  local ts = tonumber(b[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  if tokens < cost then wait = math.max(wait, (cost - tokens) / rate) end
end
for i = 1, n do
  local cap = tonumber(ARGV[3 * i])
  local rate = tonumber(ARGV[3 * i + 1])
  local tokens = levels[i]
  if wait == 0 then tokens = tokens - math.min(tonumber(ARGV[3 * i + 2]), cap) end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate * 1000) + 1000)
end
local h = n + 3 * m
if wait > 0 or #KEYS == h then return {tostring(wait), '0', '0', 0} end
local usage, holds = KEYS[h + 1], KEYS[h + 2]
local id, usd, limit = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
-- Holds whose replica never settled them (it died mid-request) lapse here.
local lapsed = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
for _, old in ipairs(lapsed) do
  local amount = redis.call('HGET', usage, 'hold:' .. old)
  if amount then
    redis.call('HDEL', usage, 'hold:' .. old)
    redis.call('HINCRBYFLOAT', usage, 'held', -tonumber(amount))
  end
end
if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', holds, '-inf', now) end
local c = redis.call('HMGET', usage, 'usd', 'held')
local spent = tonumber(c[1]) or 0
local held = math.max(0, tonumber(c[2]) or 0)
if spent >= limit - SLACK or spent + held + usd > limit + SLACK then
  return {'0', tostring(spent), tostring(held), 0}
end
redis.call('HSET', usage, 'hold:' .. id, ARGV[a + 1])
held = tonumber(redis.call('HINCRBYFLOAT', usage, 'held', ARGV[a + 1]))
redis.call('ZADD', holds, now + tonumber(ARGV[a + 4]), id)
redis.call('PEXPIRE', usage, ARGV[a + 3])
redis.call('PEXPIRE', holds, ARGV[a + 3])
return {'0', tostring(spent), tostring(held), 1}
""".replace("SLACK", repr(BUDGET_SLACK_USD))

# One settle on its own (a replay after an outage): KEYS: the counters, their holds, the settled
# marker; ARGV: the hold id, the counters' ttl (ms), then field, amount pairs.
_SETTLE = _SETTLE_FN + "return settle(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], 3, #ARGV)\n"

# KEYS[1]: a hash of counters; ARGV: ttl in ms, then field, amount pairs. One script, so the
# counters and their expiry change together, whichever replicas add at the same moment.
_ADD = """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


class RedisStore(StateStore):
    name = "redis"
    shared = True

    def __init__(self, url: str, *, timeout_s: float = 0.5, cooldown_s: float = 1.0, prefix: str = "hg:") -> None:
        self._url = url
        self._timeout = timeout_s
        self._cooldown = cooldown_s
        self._prefix = prefix
        self._down_until = 0.0
        self._client = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._admit = self._client.register_script(_ADMIT)
        self._settle = self._client.register_script(_SETTLE)
        self._add = self._client.register_script(_ADD)
        self._handlers: dict[str, list[Handler]] = {}
        self._listener: asyncio.Task[None] | None = None

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def _call(self, what: str, coro_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"redis unavailable ({what}: cooling down after a failure)")
        try:
            # asyncio.timeout as a backstop: socket timeouts do not cover every wait in the client.
            async with asyncio.timeout(self._timeout * 2):
                return await coro_fn(*args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + self._cooldown
            log.warning("state_store_unavailable", backend="redis", op=what, error=type(exc).__name__)
            raise StoreUnavailable(f"redis unavailable ({what}: {type(exc).__name__})") from None

    async def get(self, key: str) -> bytes | None:
        value = await self._call("get", self._client.get, self._key(key))
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._call("set", lambda: self._client.set(self._key(key), value, px=max(1, int(ttl_s * 1000))))

    async def delete(self, key: str) -> None:
        await self._call("delete", self._client.delete, self._key(key))

    async def take(self, buckets: list[Bucket]) -> float:
        return (await self.admit(buckets, None)).wait_s

    def _settle_keys(self, key: str, settle_id: str) -> list[str]:
        return [self._key(key), self._key(key + ":holds"), self._key(f"{key}:settled:{settle_id}")]

    async def admit(self, buckets: list[Bucket], hold: Hold | None, settles: Sequence[Settle] = ()) -> Admission:
        keys = [self._key(b.key) for b in buckets]
        args: list[str | float] = [len(buckets), len(settles)]
        for b in buckets:
            args += [b.capacity, b.rate, b.cost]
        for s in settles:
            keys += self._settle_keys(s.key, s.id)
            args += [s.id, max(1, int(s.ttl_s * 1000)), len(s.amounts)]
            for name, value in s.amounts.items():
                args += [name, repr(float(value))]
        if hold is not None:
            keys += [self._key(hold.key), self._key(hold.key + ":holds")]
            args += [hold.id, repr(hold.usd), repr(hold.limit_usd), max(1, int(hold.ttl_s * 1000)), hold.lapse_s]
        wait, spent, held, placed = await self._call("admit", self._admit, keys, args)
        return Admission(wait_s=float(wait), spent_usd=float(spent), held_usd=float(held), held=bool(placed))

    async def settle(self, key: str, settle_id: str, amounts: Mapping[str, float], ttl_s: float) -> bool:
        args: list[str | float] = [settle_id, max(1, int(ttl_s * 1000))]
        for name, value in amounts.items():
            args += [name, repr(float(value))]
        return bool(await self._call("settle", self._settle, self._settle_keys(key, settle_id), args))

    async def add(self, key: str, amounts: Mapping[str, float], ttl_s: float) -> None:
        args: list[str | float] = [max(1, int(ttl_s * 1000))]
        for name, value in amounts.items():
            args += [name, repr(float(value))]
        await self._call("add", lambda: self._add(keys=[self._key(key)], args=args))

    async def counters(self, key: str) -> dict[str, float]:
        raw = await self._call("counters", self._client.hgetall, self._key(key))
        return {str(k, "utf-8") if isinstance(k, bytes) else str(k): float(v) for k, v in raw.items()}

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call("publish", self._client.publish, self._key(channel), message)

    def subscribe(self, channel: str, handler: Handler) -> None:
        self._handlers.setdefault(channel, []).append(handler)
        if self._listener is not None:
            self._listener.cancel()  # restarted below with the new channel list
        self._listener = asyncio.create_task(self._listen(), name="state-store-pubsub")

    async def _listen(self) -> None:
        # Its own connection without a read timeout (it waits for messages), reconnecting after
        # an outage; a message published while Redis was down is lost, as pub/sub does.
        channels = [self._key(c) for c in self._handlers]
        while True:
            client = Redis.from_url(self._url, socket_connect_timeout=self._timeout, retry=Retry(NoBackoff(), 0))
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        await self._dispatch(str(msg["channel"], "utf-8", "replace")
                                             if isinstance(msg["channel"], bytes) else str(msg["channel"]),
                                             bytes(msg["data"]))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("state_store_subscription_lost", backend="redis", error=type(exc).__name__)
                await asyncio.sleep(self._cooldown)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _dispatch(self, channel: str, data: bytes) -> None:
        for handler in self._handlers.get(channel.removeprefix(self._prefix), ()):
            try:
                await handler(data)
            except Exception as exc:  # a bad handler must not end the subscription
                log.error("store_handler_failed", error=type(exc).__name__)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        with contextlib.suppress(Exception):
            await self._client.aclose()
