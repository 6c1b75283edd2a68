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
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


class StreamDeadline:
    """Create it inside the task that will await the chunks."""

    def __init__(self, deadline: float) -> None:  # deadline: absolute time.monotonic()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "StreamDeadline needs a running task"
        self._task = task
        self._deadline = deadline
        self._waiting = False
        self._cancelled_by_us = False
        self._handle = loop.call_at(loop.time() + (deadline - time.monotonic()), self._fire)

    def _fire(self) -> None:
        if self._waiting and not self._cancelled_by_us:
            self._cancelled_by_us = True
            self._task.cancel()

    async def next(self, it: AsyncIterator[T]) -> T:
        """`anext(it)`, or TimeoutError once the deadline has passed."""
        if time.monotonic() >= self._deadline:
            raise TimeoutError
        self._waiting = True
        try:
            return await anext(it)
        except asyncio.CancelledError:
            if self._cancelled_by_us:
                self._cancelled_by_us = False
                if self._task.uncancel() == 0:  # ours was the only cancellation
                    raise TimeoutError from None
            raise
        finally:
            self._waiting = False

    def close(self) -> None:
        self._handle.cancel()
