"""The direct OpenAI backend reads SSE however the bytes are cut by the network."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from gateway.backends.base import BackendError, CallOptions
from gateway.backends.openai_http import OpenAIHTTPBackend


def _event(i: int) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
    return b"data: " + json.dumps(chunk).encode()


async def _serve(pieces: list[bytes]) -> tuple[asyncio.Server, int]:
    """A loopback HTTP server answering one SSE body, written in the given pieces, then closing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.002)  # separate reads on the client side
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _collect(port: int) -> list[str]:
    backend = OpenAIHTTPBackend("up", model="m", api_base=f"http://127.0.0.1:{port}/v1", api_key=None, timeout_s=5)
    try:
        stream: AsyncIterator[dict] = backend.stream({"messages": []}, CallOptions(deadline=time.monotonic() + 5))
        return [c["choices"][0]["delta"]["content"] async for c in stream]
    finally:
        await backend.aclose()


def _cut(body: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in sizes:
        out.append(body[i : i + n])
        i += n
    return [*out, body[i:]]


@pytest.mark.parametrize("sizes", [[1] * 40, [7, 3, 50, 2], [10_000], [33, 1, 1, 1, 90]])
async def test_events_cut_anywhere_are_read_whole(sizes: list[int]) -> None:
    body = b"".join(_event(i) + (b"\r\n\r\n" if i % 2 else b"\n\n") for i in range(5)) + b": comment\n\ndata: [DONE]\n\n"
    server, port = await _serve(_cut(body, sizes))
    async with server:
        assert await _collect(port) == [f"w{i} " for i in range(5)]


async def test_a_last_line_without_its_newline_still_counts() -> None:
    server, port = await _serve([_event(0) + b"\n\n" + _event(1) + b"\n\ndata: [DONE]"])
    async with server:
        assert await _collect(port) == ["w0 ", "w1 "]


async def test_a_stream_without_done_is_an_error() -> None:
    server, port = await _serve([_event(0) + b"\n\n" + _event(1)])
    async with server:
        with pytest.raises(BackendError, match="without \\[DONE\\]"):
            await _collect(port)


async def test_an_endless_line_is_refused_not_buffered() -> None:
    server, port = await _serve([b"data: " + b"x" * 65536] * 20)  # 1.3 MB and no newline
    async with server:
        with pytest.raises(BackendError, match="line too long"):
            await _collect(port)
