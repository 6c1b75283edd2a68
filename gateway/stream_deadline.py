"""The request's deadline over a stream's chunk waits, with one timer for the whole stream.

`asyncio.timeout` around each `anext` builds a Timeout and a timer per chunk: about 7 us a chunk
here, a tenth of what the gateway adds to a short streamed answer. This guard arms one timer at
the deadline; if it fires while a chunk is awaited, that wait is cancelled and surfaces as
TimeoutError, the same as asyncio.timeout. A cancellation from elsewhere (the client left, the
server stops) stays a cancellation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal, TypeVar

from gateway.backends.base import BackendError
from gateway.policy.pace import Pace

T = TypeVar("T")

SlowReason = Literal["slow_first_token", "stalled", "slow_stream"]


class SlowError(BackendError):
    """A target too slow to wait on. Counted against its connectivity like a timeout, but not
    retried on the same target: the point is to move on."""

    def __init__(self, reason: SlowReason, message: str) -> None:
        super().__init__("timeout", message)
        self._reason = reason

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def retryable(self) -> bool:
        return False


class StreamDeadline:
    """Create it inside the task that will await the chunks.

    With a `pace` it also watches the stream's health with the same single timer: silence longer
    than `stall_s` since the last chunk, or fewer than `min_tokens_per_s` chunks a second over
    each `rate_window_s` (a content chunk is about a token), ends the wait with SlowError
    (`stalled` / `slow_stream`). A chunk costs one clock read and one increment; the timer is
    re-armed lazily, when it fires. `may_move` is asked before giving up on a slow stream: when
    no other target could take over, a slow answer is better than none, and the wait goes on.
    """

    def __init__(self, deadline: float, pace: Pace | None = None,
                 may_move: Callable[[], bool] | None = None) -> None:  # deadline: absolute time.monotonic()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "StreamDeadline needs a running task"
        self._loop = loop
        self._task = task
        self._deadline = deadline
        self._waiting = False
        self._cancelled_by_us = False
        self._why: SlowReason | None = None  # None: the request deadline
        self._at_deadline = loop.time() + (deadline - time.monotonic())
        watch = pace is not None and pace.watches_stream
        self._stall = pace.stall_s if watch and pace else None
        self._rate = pace.min_tokens_per_s if watch and pace else None
        self._window = pace.rate_window_s if pace else 0.0
        self._may_move = may_move or (lambda: True)
        now = loop.time()
        self._last = now  # the last chunk (or the start)
        self._chunks = 0
        self._window_start, self._window_chunks = now, 0
        self._handle = loop.call_at(self._next_check(), self._fire)

    def _next_check(self) -> float:
        at = self._at_deadline
        if self._stall is not None:
            at = min(at, self._last + self._stall)
        if self._rate is not None:
            at = min(at, self._window_start + self._window)
        return at

    def _fire(self) -> None:
        now = self._loop.time()
        why: SlowReason | None = None
        if now >= self._at_deadline:
            if self._waiting and not self._cancelled_by_us:
                self._why = None
                self._cancelled_by_us = True
                self._task.cancel()
            return  # past the deadline, next() refuses to wait: no more checks needed
        if self._stall is not None and now - self._last >= self._stall:
            if self._waiting:
                why = "stalled"
            else:  # the client has not taken the last chunk yet: the upstream is not the one late
                self._last = now
        elif self._rate is not None and now - self._window_start >= self._window:
            rate = (self._chunks - self._window_chunks) / (now - self._window_start)
            # Not waiting means the client is the slow one (it has not taken the last chunk yet):
            # never blame the upstream for that.
            if rate < self._rate and self._waiting:
                why = "slow_stream"
            self._window_start, self._window_chunks = now, self._chunks
        if why is not None and not self._cancelled_by_us and self._may_move():
            self._why = why
            self._cancelled_by_us = True
            self._task.cancel()
            return
        if why == "stalled":
            self._last = now  # nowhere to go: look again one stall later
        self._handle = self._loop.call_at(self._next_check(), self._fire)

    async def next(self, it: AsyncIterator[T]) -> T:
        """`anext(it)`, or TimeoutError once the deadline has passed, or SlowError."""
        if time.monotonic() >= self._deadline:
            raise TimeoutError
        self._waiting = True
        try:
            chunk = await anext(it)
        except asyncio.CancelledError:
            if self._cancelled_by_us:
                self._cancelled_by_us = False
                if self._task.uncancel() == 0:  # ours was the only cancellation
                    if self._why is None:
                        raise TimeoutError from None
                    raise SlowError(self._why, _MESSAGES[self._why]) from None
            raise
        finally:
            self._waiting = False
        self._last = self._loop.time()
        self._chunks += 1
        return chunk

    def close(self) -> None:
        self._handle.cancel()


_MESSAGES: dict[SlowReason, str] = {
    "slow_first_token": "no first token in time",
    "stalled": "the stream went silent",
    "slow_stream": "the stream fell under its minimum token rate",
}
