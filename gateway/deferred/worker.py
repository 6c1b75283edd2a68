"""Sends due deferred requests once a target of theirs is reachable, and delivers callbacks.

Each replica runs one worker; they share the queue, and a job is sent by whichever claims it
(atomically, under a lease longer than a request may take). The worker wakes every `poll_s`, and
at once when a cloud target comes back online. Jobs are sent one at a time: a backlog drains at
the pace of one request in flight per replica.

A queued job reserves nothing on its client's budget (its hold was released when it was
deferred: minutes of waiting must not starve the client's other requests). When it is sent it
holds its estimated maximum cost like any request, and settles with what it cost; a job whose
hold does not fit waits while other requests hold the budget, and fails with `budget_exceeded`
once the spend alone leaves it no room this period.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from gateway.backends.base import CallOptions
from gateway.deferred.job import Job
from gateway.deferred.queue import QueueUnavailable
from gateway.dispatch import AllTargetsFailed
from gateway.pipeline import max_tokens, without_images
from gateway.runtime import Runtime
from gateway.store import admission
from gateway.store.base import Hold, fits
from gateway.store.budgets import Charge
from gateway.wire import openai_chat

if TYPE_CHECKING:
    from gateway.deferred.service import DeferredService

log = structlog.get_logger("gateway.deferred")

_CALLBACK_TRIES = 3
_UNREACHABLE = ("connect", "timeout")  # waiting for connectivity: not an attempt that counts


class DeferredWorker:
    def __init__(self, service: DeferredService, runtime: Callable[[], Runtime]) -> None:
        self._service = service
        self._runtime = runtime
        self.owner = uuid.uuid4().hex
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deferred-worker")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except QueueUnavailable as exc:
                log.warning("deferred_queue_unavailable", error=str(exc)[:200])
            except Exception as exc:  # a bug here must never stop later deliveries
                log.error("deferred_worker_failed", error=type(exc).__name__)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can drop a cancel
                async with asyncio.timeout(self._runtime().policy.deferred.poll_s):
                    await self._wake.wait()

    async def tick(self) -> int:
        """Send every due job whose targets are reachable; how many were sent."""
        rt = self._runtime()
        if not any(rt.monitor.state(t) == "online" for t in rt.policy.cloud_targets):
            return 0  # nothing could be sent: no need to ask the queue
        queue = self._service.queue
        if not await queue.pending():
            return 0
        lease_s = rt.policy.limits.request_timeout_s + 30  # no other worker takes it while it is sent
        sent = 0
        while (job := await queue.claim(self.owner, lease_s)) is not None:
            sent += await self._send(rt, job)
        return sent

    def _body(self, rt: Runtime, job: Job, target: str) -> dict[str, Any]:
        if rt.policy.takes_images(target):
            return job.body
        return without_images(job.body)[0]

    async def _send(self, rt: Runtime, job: Job) -> int:
        cfg = rt.policy.deferred
        queue = self._service.queue
        chain = tuple(t for t in job.chain if t in rt.policy.targets and rt.policy.is_cloud(t))
        if not chain:
            await self._finish(rt, replace(job, status="failed", completed=time.time(), error={
                "message": "The targets this request may go to are no longer in the policy.",
                "code": "target_removed"}))
            return 0
        if not any(rt.monitor.state(t) == "online" for t in chain):
            await queue.release(job, self.owner, cfg.poll_s, attempted=False)
            return 0
        admitted = await admission.admit(rt.store, None, rt.budgets, job.client, tokens=0,
                                         prompt_tokens=job.prompt_tokens, max_tokens=max_tokens(job.body), pinned=None)
        budget = admitted.budget
        if budget.status == "exceeded":
            assert budget.limit_usd is not None
            if fits(budget.spent_usd, 0.0, budget.hold_usd, budget.limit_usd):  # held by others: it may fit soon
                await queue.release(job, self.owner, cfg.poll_s, attempted=False)
                return 0
            await self._finish(rt, replace(job, status="failed", completed=time.time(), error={
                "message": f"The client's {budget.period} budget (${budget.limit_usd:g}) has no room for this "
                           f"request: ${budget.spent_usd:.6f} spent, up to ${budget.hold_usd:.6f} needed.",
                "code": "budget_exceeded"}))
            return 0
        hold = admitted.hold
        opts = CallOptions(deadline=time.monotonic() + rt.policy.limits.request_timeout_s, request_id=job.id,
                           idempotency_key=job.idempotency_key)
        try:
            outcome = await rt.dispatcher.complete(chain, lambda t: self._body(rt, job, t), opts)
        except BaseException as exc:
            if rt.budgets is not None:
                rt.budgets.release(hold, job.client)
            if not isinstance(exc, AllTargetsFailed):
                raise
            error = {"message": "; ".join(f"{t}: {e.reason}" for t, e in exc.errors)[:1000],
                     "code": "upstream_rejected" if exc.invalid is not None else "all_targets_unavailable"}
            waiting = exc.invalid is None and all(e.kind in _UNREACHABLE for _, e in exc.errors)
            attempts = job.attempts + (0 if waiting else 1)
            if exc.invalid is not None or attempts >= cfg.max_attempts:
                await self._finish(rt, replace(job, status="failed", attempts=attempts, error=error,
                                               completed=time.time()))
            else:
                delay = cfg.poll_s if waiting else min(300.0, cfg.poll_s * 2 ** attempts)
                await queue.release(job, self.owner, delay, attempted=not waiting, error=error)
            log.warning("deferred_send_failed", id=job.id, attempts=attempts, waiting=waiting)
            return 0
        answer, _ = openai_chat.completion(outcome.response or {}, model=outcome.target,
                                           prompt_tokens=job.prompt_tokens)
        self._charge(rt, job, hold, outcome.target, answer)
        done = replace(job, status="completed", attempts=job.attempts + 1, target=outcome.target, result=answer,
                       error=None, completed=time.time(), callback="pending" if job.callback_url else None)
        if await self._finish(rt, done) and done.callback_url:
            task = asyncio.create_task(self._deliver(done))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
        return 1

    @staticmethod
    def _charge(rt: Runtime, job: Job, hold: Hold | None, target: str, answer: dict[str, Any]) -> None:
        """The answer's usage on its client's counters and its hold released, as for an answer
        given at once."""
        if rt.budgets is None or job.client is None:
            return
        used = answer.get("usage") or {}
        prompt, completion = used.get("prompt_tokens"), used.get("completion_tokens")
        estimated = not (isinstance(prompt, int) and isinstance(completion, int))
        charge = Charge(target, prompt if isinstance(prompt, int) else job.prompt_tokens,
                        completion if isinstance(completion, int) else 0, estimated=estimated)
        try:
            rt.budgets.charge(job.client, hold, [charge])
        except Exception as exc:  # counting must never stop a delivery
            log.error("usage_charge_failed", error=type(exc).__name__, id=job.id)

    async def _finish(self, rt: Runtime, job: Job) -> bool:
        if await self._service.queue.finish(job, self.owner, rt.policy.deferred.retention_s):
            log.info("deferred_finished", id=job.id, status=job.status, target=job.target, attempts=job.attempts)
            return True
        # The lease ran out and another worker holds it now: its outcome is the one recorded.
        log.warning("deferred_lease_lost", id=job.id)
        return False

    async def _deliver(self, job: Job) -> None:
        assert job.callback_url is not None
        payload = self._service.view(job)
        state = "failed"
        async with httpx.AsyncClient(trust_env=False, timeout=10.0, follow_redirects=False) as client:
            for attempt in range(_CALLBACK_TRIES):
                try:
                    resp = await client.post(job.callback_url, json=payload,
                                             headers={"Idempotency-Key": job.idempotency_key})
                    if resp.is_success:
                        state = "delivered"
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(2 ** attempt)
        log.info("deferred_callback", id=job.id, state=state)
        with contextlib.suppress(QueueUnavailable):
            await self._service.queue.set_callback(job.id, state)

    async def aclose(self) -> None:
        for task in [self._task, *self._callbacks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
