"""The shared store on Redis (redis-py's asyncio client), for several replicas.

Coordination is Redis's own: TTLs on keys, one Lua script for the token buckets (atomic on the
server, timed by the server's clock so replicas' clocks do not matter), pub/sub for fleet-wide
switches. Every call has a bounded socket timeout; after a failure the store answers
StoreUnavailable at once for `cooldown_s`, so an outage costs requests no waiting, and it tries
Redis again after that, so the state returns when Redis does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.store.base import Bucket, Handler, StateStore, StoreUnavailable

log = structlog.get_logger("gateway.store")

# KEYS: one hash per bucket; ARGV: capacity, rate (tokens/s), cost for each key in turn.
# Returns "0" when every bucket gave its cost, else the seconds until all could (nothing taken).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1])
  local cost = math.min(tonumber(ARGV[3 * i]), cap)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or cap
  local ts = tonumber(b[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  if tokens < cost then wait = math.max(wait, (cost - tokens) / rate) end
end
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1])
  local tokens = levels[i]
  if wait == 0 then tokens = tokens - math.min(tonumber(ARGV[3 * i]), cap) end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(cap / rate * 1000) + 1000)
end
return tostring(wait)
"""

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
        self._take = self._client.register_script(_TAKE)
        self._add = self._client.register_script(_ADD)
        self._handlers: dict[str, list[Handler]] = {}
        self._listener: asyncio.Task[None] | None = None

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def _call(self, what: str, coro_fn, *args):  # type: ignore[no-untyped-def]
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
        args: list[float] = []
        for b in buckets:
            args += [b.capacity, b.rate, b.cost]
        keys = [self._key(b.key) for b in buckets]
        wait = await self._call("take", lambda: self._take(keys=keys, args=args))
        return float(wait)

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
