"""The deferred queue's own contract, on both implementations: a job is claimed by one holder at
a time even with several claimers on separate connections, a lost lease makes it claimable again
and its old holder can no longer record it, and a repeated idempotency key stores nothing new."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.deferred.job import Job, new_id
from gateway.deferred.queue import DeferredQueue
from gateway.deferred.sqlite import SqliteQueue
from tests.fleet.redis_server import RedisServer


def job(i: int, client: str | None = "app") -> Job:
    job_id = new_id()
    return Job(id=job_id, client=client, body={"model": "auto", "messages": [{"role": "user", "content": f"n{i}"}]},
               chain=("cloud",), rule="r", idempotency_key=f"key-{i}", prompt_tokens=3)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.slow)])
def queues(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], DeferredQueue]]:
    made: list[DeferredQueue] = []
    if request.param == "sqlite":
        def make() -> DeferredQueue:
            made.append(SqliteQueue(tmp_path / "deferred.sqlite3"))  # each its own connection
            return made[-1]
        yield make
    else:
        from gateway.deferred.redis import RedisQueue

        server = RedisServer(tmp_path).start()

        def make() -> DeferredQueue:
            made.append(RedisQueue(server.url, timeout_s=2))
            return made[-1]
        yield make
        server.kill()


def test_each_job_is_claimed_once_by_concurrent_claimers(queues: Callable[[], DeferredQueue]) -> None:
    async def run() -> None:
        first = queues()
        jobs = [await first.submit(job(i), retention_s=60) for i in range(12)]
        again = await first.submit(replace(job(3), id=new_id()), retention_s=60)
        assert again.id == jobs[3].id  # same client and key: the first job back
        other = await first.submit(replace(job(3, client="other"), id=new_id()), retention_s=60)
        assert other.id != jobs[3].id  # another client's key is its own
        claimers = [queues() for _ in range(4)]

        async def drain(q: DeferredQueue, owner: str) -> list[str]:
            got = []
            while (j := await q.claim(owner, lease_s=30)) is not None:
                got.append(j.id)
                await asyncio.sleep(0)
            return got

        claimed = await asyncio.gather(*(drain(q, f"w{i}") for i, q in enumerate(claimers)))
        ids = [i for c in claimed for i in c]
        assert sorted(ids) == sorted([j.id for j in jobs] + [other.id])  # every job, each once
        assert await first.claim("late", lease_s=30) is None
        for q in [first, *claimers]:
            await q.aclose()

    asyncio.run(run())


def test_a_lost_lease_passes_the_job_on(queues: Callable[[], DeferredQueue]) -> None:
    async def run() -> None:
        q = queues()
        submitted = await q.submit(job(1), retention_s=60)
        held = await q.claim("a", lease_s=0.2)
        assert held is not None and held.id == submitted.id and await q.pending()
        assert await q.claim("b", lease_s=30) is None  # held: nobody else gets it
        await asyncio.sleep(0.4)
        again = await q.claim("b", lease_s=30)
        assert again is not None and again.id == submitted.id  # the lease ran out
        done = replace(again, status="completed", attempts=1, target="cloud", result={"choices": []}, completed=1.0)
        assert not await q.finish(done, "a", retention_s=60)  # "a" lost it: its outcome is not recorded
        assert await q.finish(done, "b", retention_s=60)
        stored = await q.get(submitted.id)
        assert stored is not None and stored.status == "completed" and stored.target == "cloud"
        assert not await q.pending() and await q.claim("c", lease_s=30) is None
        # Released without a count (waiting for connectivity), then with one.
        j2 = await q.submit(job(2), retention_s=60)
        held = await q.claim("a", lease_s=30)
        assert held is not None and held.id == j2.id
        await q.release(held, "a", delay_s=0.0, attempted=True, error={"code": "x", "message": "m"})
        back = await q.claim("a", lease_s=30)
        assert back is not None and back.attempts == 1 and back.error == {"code": "x", "message": "m"}
        await q.aclose()

    asyncio.run(run())
