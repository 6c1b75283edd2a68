"""The shared queue on Redis, for a fleet: a hash per job, one sorted set of ids by the time each
is due (queued: when accepted; in progress: when its lease ends), and Lua scripts for every
change of hands, so a claim is atomic on the server and timed by its clock. Keys expire with the
job's retention (the store enforces it). One Redis, not a cluster (the scripts name keys they
compute)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.deferred.job import Job
from gateway.deferred.queue import DeferredQueue, QueueUnavailable

# KEYS: idempotency key, job hash, due set; ARGV: id, spec, client, retention (ms).
_SUBMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('HSET', KEYS[2], 'spec', ARGV[2], 'client', ARGV[3], 'status', 'queued', 'attempts', 0)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
return ARGV[1]
"""

# KEYS: due set; ARGV: owner, lease (s), job key prefix. Returns the claimed id or false.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 16)
for _, id in ipairs(ids) do
  local key = ARGV[3] .. id
  local status = redis.call('HGET', key, 'status')
  if (not status) or status == 'completed' or status == 'failed' then
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('HSET', key, 'status', 'in_progress', 'owner', ARGV[1])
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    return id
  end
end
return false
"""

# KEYS: job hash, due set; ARGV: owner, id, delay (s), attempted (0/1), error JSON or ''.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then
  return 0
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'status', 'queued', 'owner', '')
redis.call('HINCRBY', KEYS[1], 'attempts', tonumber(ARGV[4]))
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) else redis.call('HDEL', KEYS[1], 'error') end
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3]), ARGV[2])
return 1
"""

# KEYS: job hash, due set; ARGV: owner, id, retention (ms), then field, value pairs.
_FINISH = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then
  return 0
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'owner', '')
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: job hash; ARGV: callback state. Only on a job still kept (no key without a TTL).
_CALLBACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'callback', ARGV[1]) end
return 1
"""


def _str(value: bytes | None) -> str | None:
    return value.decode() if value else None


class RedisQueue(DeferredQueue):
    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5, prefix: str = "hg:deferred:") -> None:
        self._timeout = timeout_s
        self._prefix = prefix
        self._due = prefix + "due"
        self._client = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._submit = self._client.register_script(_SUBMIT)
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)
        self._finish = self._client.register_script(_FINISH)
        self._callback = self._client.register_script(_CALLBACK)

    def _job_key(self, job_id: str) -> str:
        return self._prefix + "job:" + job_id

    def _idem_key(self, client: str | None, key: str) -> str:
        # Hashed: the client's idempotency key is its own text, never written to the store as is.
        digest = hashlib.sha256(f"{client or ''}\0{key}".encode()).hexdigest()
        return self._prefix + "idem:" + digest

    async def _call(self, what: str, fn: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout * 2):
                return await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            raise QueueUnavailable(f"deferred queue on redis ({what}: {type(exc).__name__})") from None

    async def submit(self, job: Job, retention_s: float) -> Job:
        ms = max(1, int(retention_s * 1000))
        keys = [self._idem_key(job.client, job.idempotency_key), self._job_key(job.id), self._due]
        got = await self._call("submit", lambda: self._submit(keys=keys, args=[job.id, job.spec(), job.client or "", ms]))
        got = got.decode() if isinstance(got, bytes) else str(got)
        if got == job.id:
            return job
        existing = await self.get(got)
        if existing is None:  # expired between the two calls: nothing to hand back
            raise QueueUnavailable("deferred queue on redis: idempotent job vanished")
        return existing

    async def get(self, job_id: str) -> Job | None:
        h = await self._call("get", lambda: self._client.hgetall(self._job_key(job_id)))
        if not h or b"spec" not in h:
            return None
        return Job.from_spec(
            job_id, h[b"spec"], status=h[b"status"].decode(), attempts=int(h.get(b"attempts") or 0),
            target=_str(h.get(b"target")),
            result=orjson.loads(h[b"result"]) if h.get(b"result") else None,
            error=orjson.loads(h[b"error"]) if h.get(b"error") else None,
            completed=float(h[b"completed"]) if h.get(b"completed") else None, callback=_str(h.get(b"callback")))

    async def claim(self, owner: str, lease_s: float) -> Job | None:
        got = await self._call("claim", lambda: self._claim(keys=[self._due],
                                                            args=[owner, lease_s, self._prefix + "job:"]))
        if not got:
            return None
        return await self.get(got.decode() if isinstance(got, bytes) else str(got))

    async def release(self, job: Job, owner: str, delay_s: float, attempted: bool,
                      error: dict[str, Any] | None = None) -> None:
        args: list[str | float] = [owner, job.id, delay_s, int(attempted), orjson.dumps(error).decode() if error else ""]
        await self._call("release", lambda: self._release(keys=[self._job_key(job.id), self._due], args=args))

    async def finish(self, job: Job, owner: str, retention_s: float) -> bool:
        fields: list[Any] = ["status", job.status, "attempts", job.attempts, "completed", job.completed or 0]
        if job.target:
            fields += ["target", job.target]
        if job.result is not None:
            fields += ["result", orjson.dumps(job.result)]
        if job.error:
            fields += ["error", orjson.dumps(job.error)]
        if job.callback:
            fields += ["callback", job.callback]
        args = [owner, job.id, max(1, int(retention_s * 1000)), *fields]
        done = await self._call("finish", lambda: self._finish(keys=[self._job_key(job.id), self._due], args=args))
        return bool(done)

    async def set_callback(self, job_id: str, state: str) -> None:
        await self._call("callback", lambda: self._callback(keys=[self._job_key(job_id)], args=[state]))

    async def pending(self) -> bool:
        return bool(await self._call("pending", lambda: self._client.zcard(self._due)))

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # closing a client whose server is gone
            return
