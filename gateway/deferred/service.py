"""The deferred-request service: accepts a request (a job on the queue), answers for a job by id,
and runs the worker. One per gateway process, built from the policy it started with: where the
queue lives (state backend, deferred.dir) is fixed until a restart; the rest is read from the
current policy."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from gateway.deferred import plan
from gateway.deferred.job import Job, Sealer, new_id, valid_id
from gateway.deferred.queue import DeferredQueue, QueueUnavailable
from gateway.pipeline import Prepared
from gateway.policy.model import Policy
from gateway.runtime import Runtime
from gateway.schema import APIError

log = structlog.get_logger("gateway.deferred")

OBJECT = "chat.completion.deferred"
PATH = "/v1/deferred/"


def state_dir(policy: Policy, env: dict[str, str] | None = None) -> Path:
    env = env if env is not None else dict(os.environ)
    if policy.deferred.dir:
        return Path(policy.deferred.dir).expanduser()
    if env.get("GATEWAY_STATE_DIR"):
        return Path(env["GATEWAY_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hybrid-gateway"


def _key_file(directory: Path) -> bytes:
    """The embedded queue's sealing key when GATEWAY_VAULT_KEY is not set: 32 random bytes in a
    0600 file beside the queue, so the queue file alone (a backup, a copy) holds no raw value."""
    path = directory / "deferred.key"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    key = path.read_bytes()
    if len(key) != 32:
        raise QueueUnavailable(f"{path} is not a 32-byte key")
    return key


class DeferredService:
    def __init__(self, queue: DeferredQueue, key: Callable[[], bytes], runtime: Callable[[], Runtime]) -> None:
        self.queue = queue
        self._key = key
        self._sealer: Sealer | None = None
        self._runtime = runtime
        self._worker: Any = None

    def sealer(self) -> Sealer:
        if self._sealer is None:  # the key file is made on the first deferral, not at startup
            self._sealer = Sealer(self._key())
        return self._sealer

    # -- accepting ----------------------------------------------------------------------------
    def wants(self, rt: Runtime, prepared: Prepared) -> bool:
        """Whether this prepared request is deferred rather than dispatched now."""
        call = prepared.call
        streamed = call.body.get("stream") is True
        plan.check_stream(call.headers, streamed)
        # Connectivity first: while the cloud is reachable (almost always) nothing else is read.
        if streamed or not plan.unreachable(prepared.decision.chain, prepared.features.connectivity):
            return False
        return plan.deferrable(rt.policy, prepared.decision, call.headers)

    async def accept(self, rt: Runtime, prepared: Prepared, wire: str | None = None,
                     echo: dict[str, Any] | None = None) -> Job:
        """Queue the request, whose budget hold the caller has released (a queued job reserves
        nothing); `wire` and `echo` for one that came in on Messages or Responses
        (gateway/deferred/wire.py), whose answer is then shown in that API's shape."""
        call = prepared.call
        cfg = rt.policy.deferred
        callback = call.headers.get(plan.CALLBACK_HEADER)
        job_id = new_id()
        redacted = prepared.redacted is not None
        job = Job(
            id=job_id, client=call.client,
            body={**(prepared.redacted if prepared.redacted is not None else call.body), "stream": False},
            chain=prepared.decision.chain, rule=prepared.decision.rule,
            idempotency_key=(call.headers.get(plan.IDEMPOTENCY_HEADER) or "")[:256] or job_id,
            prompt_tokens=prepared.features.prompt_tokens,
            callback_url=plan.callback_url(callback, cfg.callback_hosts) if callback else None,
            wire=wire, echo=echo,
        )
        try:
            if redacted and prepared.vault is not None and len(prepared.vault):
                job = replace(job, sealed_vault=self.sealer().seal(job_id, prepared.vault))
            stored = await self.queue.submit(job, cfg.retention_s)
        except (QueueUnavailable, OSError) as exc:
            log.error("deferred_submit_failed", error=str(exc)[:200], request_id=call.request_id)
            raise APIError(503, "The cloud is unreachable and the deferred-request queue is unavailable; retry later.",
                           code="deferred_queue_unavailable", headers={"Retry-After": "5"}) from None
        log.info("request_deferred", id=stored.id, rule=stored.rule, request_id=call.request_id,
                 duplicate=stored.id != job_id)
        if rt.budgets is not None:  # its hold, released by the caller, is off the shared budget before the 202
            await rt.budgets.flush()
        return stored

    # -- reading ------------------------------------------------------------------------------
    async def lookup(self, job_id: str, client: str | None) -> Job | None:
        """The job, if it exists and belongs to `client` (None when the policy has no clients)."""
        if not valid_id(job_id):
            return None
        try:
            job = await self.queue.get(job_id)
        except QueueUnavailable:
            raise APIError(503, "The deferred-request queue is unavailable; retry later.",
                           code="deferred_queue_unavailable", headers={"Retry-After": "5"}) from None
        if job is None or job.client != client:
            return None
        return job

    def view(self, job: Job) -> dict[str, Any]:
        """The job as its caller sees it: the answer with the request's values restored."""
        response = job.result
        if response is not None and job.sealed_vault is not None:
            response = self.sealer().open(job.id, job.sealed_vault).restore_completion(response)
        envelope = {
            "id": job.id,
            "object": OBJECT,
            "status": job.status,
            "created": int(job.created),
            "completed_at": int(job.completed) if job.completed else None,
            "attempts": job.attempts,
            "location": PATH + job.id,
            "target": job.target,
            "callback": job.callback,
            "response": response,
            "error": job.error,
        }
        if job.wire is None:
            return envelope
        from gateway.deferred import wire  # the Messages and Responses adapters, for their jobs only

        return wire.view(job, envelope, response)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        from gateway.deferred.worker import DeferredWorker

        self._worker = DeferredWorker(self, self._runtime)
        self._worker.start()

    def wake(self) -> None:
        if self._worker is not None:
            self._worker.wake()

    async def aclose(self) -> None:
        if self._worker is not None:
            await self._worker.aclose()
        await self.queue.aclose()


def build_deferred(policy: Policy, runtime: Callable[[], Runtime]) -> DeferredService:
    from gateway.store.build import VAULT_KEY_ENV, vault_key

    if policy.state.backend == "redis":
        from gateway.deferred.redis import RedisQueue

        assert policy.state.url is not None
        queue: DeferredQueue = RedisQueue(policy.state.url, timeout_s=policy.state.timeout_ms / 1000)
        return DeferredService(queue, vault_key, runtime)
    from gateway.deferred.sqlite import SqliteQueue

    directory = state_dir(policy)
    key: Callable[[], bytes] = vault_key if os.environ.get(VAULT_KEY_ENV) else (lambda: _key_file(directory))
    return DeferredService(SqliteQueue(directory / "deferred.sqlite3"), key, runtime)
