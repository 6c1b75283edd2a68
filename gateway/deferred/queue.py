"""The deferred-request queue seam: what the API and the worker ask of where jobs are kept."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from gateway.deferred.job import Job


class QueueUnavailable(Exception):
    """The queue could not answer (Redis down, disk error): the request is not accepted."""


class DeferredQueue(ABC):
    """Jobs by id. `claim` is the one place a job changes hands: atomic, so of all the workers
    (of every replica) exactly one holds a job at a time, for `lease_s`; a holder that dies lets
    the lease run out and the job becomes claimable again."""

    name: str

    @abstractmethod
    async def submit(self, job: Job, retention_s: float) -> Job:
        """Store `job`; or, when the same client already submitted its idempotency key, return
        that job instead (nothing stored)."""

    @abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    async def claim(self, owner: str, lease_s: float) -> Job | None:
        """A due job (queued, or in progress past its lease), now held by `owner`; None if none."""

    @abstractmethod
    async def release(self, job: Job, owner: str, delay_s: float, attempted: bool,
                      error: dict[str, Any] | None = None) -> None:
        """Give a held job back, due again in `delay_s`."""

    @abstractmethod
    async def finish(self, job: Job, owner: str, retention_s: float) -> bool:
        """Record `job`'s final state (status, result or error, target) if `owner` still holds it;
        False when the lease was lost (another worker has it now)."""

    @abstractmethod
    async def set_callback(self, job_id: str, state: str) -> None: ...

    @abstractmethod
    async def pending(self) -> bool:
        """Whether any job is waiting (cheap: the worker asks it on every tick)."""

    @abstractmethod
    async def aclose(self) -> None: ...
