"""EventStreamResponse at the ASGI seam: what reaches `send`, and when."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.api import event_stream
from gateway.api.event_stream import EventStreamResponse


async def _never_disconnect() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _bodies(sent: list[dict[str, Any]]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("more_body")]


async def test_events_produced_together_leave_in_one_write() -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(5):  # one network read's worth: no wait between them
            yield b"e%d;" % i
        await asyncio.sleep(0.01)
        yield b"e5;"

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await EventStreamResponse(body(), {})({"type": "http"}, _never_disconnect, send)
    assert _bodies(sent) == [b"e0;e1;e2;e3;e4;", b"e5;"]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_lone_event_is_written_before_the_next_is_produced() -> None:
    written = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first;"
        await written.wait()  # a model busy on the next token: "first" must not wait for it
        yield b"second;"

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body") == b"first;":
            written.set()

    await asyncio.wait_for(EventStreamResponse(body(), {})({"type": "http"}, _never_disconnect, send), 5)
    assert _bodies(sent) == [b"first;", b"second;"]


async def test_a_slow_client_holds_the_producer_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_stream, "_MAX_PENDING", 1000)
    produced = 0
    client_reads = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(100):
            produced += 1
            yield b"x" * 300

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if message.get("more_body"):
            await client_reads.wait()  # the client's socket buffer is full until it reads
        sent.append(message)

    response = asyncio.ensure_future(EventStreamResponse(body(), {})({"type": "http"}, _never_disconnect, send))
    await asyncio.sleep(0.05)
    # Back-pressure: the producer stopped a few events past the limit instead of buffering all 100.
    assert produced <= 6
    client_reads.set()
    await asyncio.wait_for(response, 5)
    assert b"".join(_bodies(sent)) == b"x" * 300 * 100


async def test_a_failed_write_ends_the_stream_and_closes_the_body() -> None:
    closed = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick;"
                await asyncio.sleep(0)
        finally:
            closed.set()

    async def send(message: dict[str, Any]) -> None:
        if message.get("more_body"):
            raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        await asyncio.wait_for(EventStreamResponse(body(), {})({"type": "http"}, _never_disconnect, send), 5)
    assert closed.is_set()
