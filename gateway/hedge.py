"""Hedging: when the first try has not answered after a delay, start a second one in parallel.

The first of the two to produce a result wins; the other is cancelled, which closes its upstream
connection (or stops the engine's sequence: cancellation reaches the backend's stream as an
`aclose`). What each try does is the caller's business: the dispatcher races its walk of the
route against its walk of the rest of the chain, so a hedge only ever reaches targets of the
decision's chain, with the body that target would have got anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Hedge:
    """For metrics and the audit line."""

    source: str  # the slow route
    started: str  # the target the hedge went to first
    winner: str | None = None


@dataclass
class Race(Generic[T]):
    value: T | None = None  # the winner's result; None when both failed, or the first failed early
    from_hedge: bool = False  # the second try produced `value`
    hedged: bool = False  # the second try was started
    first_error: BaseException | None = None
    second_error: BaseException | None = None


async def race(first: Callable[[], Awaitable[T]], second: Callable[[], Awaitable[T]], after_s: float,
               discard: Callable[[T], Awaitable[None]], progressed: asyncio.Event | None = None) -> Race[T]:
    """Run `first`; if it has not finished after `after_s`, run `second` alongside it.

    Returns early, unhedged, when `first` fails before the delay: the caller then goes on as for
    any failure. `progressed`, set by `first` when it starts answering (its first token), means
    it is not the silent one: it is then awaited to its end, unhedged, however long its answer
    takes. `discard` releases a result that lost (both finished in the same loop turn).
    """
    one: asyncio.Future[T] = asyncio.ensure_future(first())
    two: asyncio.Future[T] | None = None
    started: asyncio.Future[Any] | None = asyncio.ensure_future(progressed.wait()) if progressed else None
    try:
        watched: set[asyncio.Future[Any]] = {one} if started is None else {one, started}
        done, _ = await asyncio.wait(watched, timeout=after_s, return_when=asyncio.FIRST_COMPLETED)
        if one not in done and started in done:
            await asyncio.wait({one})
            done = {one}
        if done:
            exc = one.exception()
            return Race(value=None if exc else one.result(), first_error=exc)
        two = asyncio.ensure_future(second())
        result: Race[T] = Race(hedged=True)
        pending: set[asyncio.Future[T]] = {one, two}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # The first try is preferred when both finish in the same turn.
            for task in sorted(done, key=lambda t: t is not one):
                exc = task.exception()
                if exc is not None:
                    if task is one:
                        result.first_error = exc
                    else:
                        result.second_error = exc
                elif result.value is None:
                    result.value, result.from_hedge = task.result(), task is two
                else:
                    await discard(task.result())
            if result.value is not None:
                return result
        return result
    finally:
        await _cancel(one, two, started)


async def _cancel(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel the tries still running and wait for them to close their connections."""
    running = [t for t in tasks if t is not None and not t.done()]
    for t in running:
        t.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)
