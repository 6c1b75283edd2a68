"""A `text/event-stream` ASGI response that stops the moment the client goes away.

Starlette's StreamingResponse watches for the client's disconnect by running the stream and a
listener in an anyio task group, per request: task group, cancel scopes, two tasks. On the
streaming hot path that was about a tenth of what the gateway adds to a request. Here one plain
asyncio task waits for `http.disconnect` and, when it comes first, cancels the streaming task,
wherever it is waiting (an upstream that stalls, a local model mid-token). The body's own
cleanup (closing the upstream, the audit record) runs through `aclose` either way.

uvicorn drops writes to a closed connection silently, so without the watcher a disconnected
client would keep a local model generating to `max_tokens`.

Events are written by a second task, which takes everything produced since its last write: when
an upstream's events arrive together (one network read holding several), they leave in one
write instead of one system call each, and a lone event (a model producing one token at a
time) leaves as soon as the stream stops to wait for the next, with no timer or delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from starlette.types import Receive, Scope, Send

# Beyond this many bytes not yet written (a slow client), the stream waits for the writer, so a
# fast upstream cannot fill memory: back-pressure reaches it as before.
_MAX_PENDING = 1 << 16


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Writer:
    """Writes what the stream produced since its last write, in one `http.response.body`."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._pending: list[bytes] = []
        self._size = 0
        self._ready = asyncio.Event()  # something to write, or closing
        self._written = asyncio.Event()  # a write finished (or the writer stopped)
        self._closing = False
        self.task = asyncio.ensure_future(self._run())

    async def write(self, data: bytes) -> None:
        if self.task.done():
            self.task.result()  # raises the writer's error
            raise RuntimeError("event stream writer stopped")
        self._pending.append(data)
        self._size += len(data)
        self._ready.set()
        while self._size > _MAX_PENDING and not self.task.done():
            self._written.clear()
            await self._written.wait()

    async def close(self) -> None:
        self._closing = True
        self._ready.set()
        await self.task

    async def _run(self) -> None:
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                if self._pending:
                    body = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
                    self._pending.clear()
                    self._size = 0
                    await self._send({"type": "http.response.body", "body": body, "more_body": True})
                    self._written.set()
                if self._closing and not self._pending:
                    return
        finally:
            self._written.set()  # never leave the stream waiting on a writer that is gone


class EventStreamResponse:
    media_type = b"text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: Mapping[str, str], status_code: int = 200) -> None:
        self.body = body
        self.status_code = status_code
        self.raw_headers = [(b"content-type", self.media_type)] + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        me = asyncio.current_task()
        finished = False
        client_left = False

        def on_disconnect(watch: asyncio.Future[None]) -> None:
            nonlocal client_left
            # The flag, not remove_done_callback: a callback already queued cannot be unqueued.
            if not finished and not watch.cancelled() and me is not None:
                client_left = True
                me.cancel()

        watcher = asyncio.ensure_future(_until_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        writer = _Writer(send)
        try:
            async for chunk in self.body:
                await writer.write(chunk)
            await writer.close()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not client_left:
                raise  # a real cancellation (shutdown), not ours
            if me is not None:
                me.uncancel()
        finally:
            finished = True
            watcher.cancel()
            writer.task.cancel()
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                await aclose()
