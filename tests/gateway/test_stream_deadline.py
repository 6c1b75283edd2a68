"""StreamDeadline: the request deadline over chunk waits, with one timer per stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from gateway.stream_deadline import StreamDeadline


async def _ticks(gap: float, n: int = 1000) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(gap)
        yield i


async def test_chunks_pass_before_the_deadline_and_a_wait_past_it_times_out() -> None:
    guard = StreamDeadline(time.monotonic() + 0.3)
    it = _ticks(0.05)
    got = []
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        while True:
            got.append(await guard.next(it))
    guard.close()
    assert 3 <= len(got) <= 6  # ~0.3 s of 0.05 s chunks
    assert time.monotonic() - t0 < 0.45  # the wait in progress was cut, not the next one
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]  # nothing left pending


async def test_a_stalled_source_is_cut_at_the_deadline() -> None:
    guard = StreamDeadline(time.monotonic() + 0.1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await guard.next(_ticks(5))
    assert time.monotonic() - t0 < 0.5


async def test_another_cancellation_stays_a_cancellation() -> None:
    async def consume() -> None:
        guard = StreamDeadline(time.monotonic() + 10)
        await guard.next(_ticks(5))

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_time_between_chunks_counts_too() -> None:
    # The timer fires while the consumer is busy elsewhere (not waiting on a chunk): nothing is
    # cancelled then, and the next wait refuses at once.
    guard = StreamDeadline(time.monotonic() + 0.05)
    it = _ticks(0)
    await guard.next(it)
    await asyncio.sleep(0.1)  # the consumer's own work, past the deadline: must not be cancelled
    with pytest.raises(TimeoutError):
        await guard.next(it)
    guard.close()
