"""uvicorn's httptools protocol, with the writes of one event-loop turn sent as one.

uvicorn writes a response's head as soon as it is given (`http.response.start`) and each body
part as its own socket write; so does every streamed event. On loopback, and behind a local
load balancer, a write is not cheap: the kernel runs TCP and wakes the receiver inside the call
(measured here, three writes were about half of the CPU the gateway spends on a small
completion). Writes made in the same turn of the event loop are joined and sent once the turn
ends: a head with its body, and the events of one upstream read, leave together. Nothing waits
for a timer: a lone write leaves as soon as the code that made it yields to the loop, which is
what a transport write did anyway (the kernel sends it then).

Only the write path changes; reading, flow control and closing are uvicorn's (a close sends what
is pending first).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class TurnCoalescingTransport:
    """Wraps an asyncio transport: `write`s made in one loop turn go out in one real write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self._transport.is_closing():
            return  # the client left within this turn: uvloop raises on writes to a closed transport
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:  # reading, flow control, extra info: the real transport
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn.Config(http=CoalescingHttpToolsProtocol)`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(TurnCoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


def uvicorn_config(app: Any, *, host: str, port: int, **options: Any) -> Any:
    """The server's uvicorn configuration (the CLI's and the test suite's)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                          http=CoalescingHttpToolsProtocol, **options)
