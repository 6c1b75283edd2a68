"""A direct OpenAI-compatible HTTP backend, for targets that speak the OpenAI API.

Most providers behind an aggregator, and every local server (llama.cpp, vLLM, Ollama), speak the
OpenAI wire format; talking to them directly costs far less per call than going through litellm
(see benchmarks/gateway_overhead.py) and lets us see the raw status, headers and bytes, which is
what the fallback logic needs. Every other provider goes through `LitellmBackend`.

The client is aiohttp: on this hot path it measured ~0.5 ms per loopback call against ~1.4 ms for
httpx's async client (same upstream, same run), and the gateway adds little else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import orjson

from gateway.backends.base import Backend, BackendError, CallOptions
from gateway.backends.errors import status_error

# Transport failures: the target could not be reached, or dropped the connection mid-answer.
_CONNECT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)
_TRAILER_WAIT_S = 1.0  # in the background: generous
_MAX_LINE = 1 << 20  # one SSE line (a big tool-call chunk fits); longer is a broken upstream


async def _then_newline(reads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body's reads, then one newline: a last line sent without its own is still a line."""
    async for data in reads:
        yield data
    yield b"\n"


class StreamReader(Protocol):
    """One stream's events of another wire format in, chat chunks out (gateway/wire/to_*.py)."""

    finished: bool  # the format's end event came: the stream is complete

    def feed(self, event: Any) -> list[dict[str, Any]]: ...


def _call_headers(opts: CallOptions) -> dict[str, str] | None:
    return {"Idempotency-Key": opts.idempotency_key} if opts.idempotency_key else None


class OpenAIHTTPBackend(Backend):
    supports_embeddings = True

    def __init__(
        self,
        name: str,
        *,
        model: str,
        api_base: str,
        api_key: str | None,
        timeout_s: float,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.model = model.removeprefix("openai/")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.embeddings_url = api_base.rstrip("/") + "/embeddings"
        self.timeout_s = timeout_s
        self.extra_body = extra_body or {}
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._draining: set[asyncio.Task[None]] = set()  # strong refs: tasks must not be collected

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the event loop that serves the requests.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=512, ttl_dns_cache=300),
                read_bufsize=1 << 20,  # what one read may buffer; a line's own bound is _MAX_LINE
                trust_env=False,  # never route device or loopback traffic through a proxy env
                auto_decompress=True,
            )
        return self._session

    def _timeout(self, opts: CallOptions, stream: bool) -> aiohttp.ClientTimeout:
        left = opts.deadline - time.monotonic()
        if left <= 0:
            raise BackendError("timeout", f"deadline passed before calling {self.name}")
        t = min(self.timeout_s, left)
        # A stream's total time is bounded by the pipeline's deadline; here only each read is.
        return aiohttp.ClientTimeout(total=None if stream else t, connect=min(t, 10.0), sock_read=t)

    def _payload(self, body: dict[str, Any], stream: bool) -> bytes:
        payload = {**body, **self.extra_body, "model": self.model, "stream": stream}
        if stream:
            opts = dict(payload.get("stream_options") or {})
            opts["include_usage"] = True
            payload["stream_options"] = opts
        else:
            payload.pop("stream_options", None)
        return orjson.dumps(payload)

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        return await self._post_json(self.url, self._payload(body, False), opts, "choices", "a chat completion")

    async def _post_json(self, url: str, payload: bytes, opts: CallOptions, list_key: str,
                         what: str) -> dict[str, Any]:
        """One non-streamed POST: errors mapped at the seam, the answer a JSON object whose
        `list_key` is a list (`what` names it in the protocol error)."""
        try:
            async with self._client().post(url, data=payload, timeout=self._timeout(opts, False),
                                           headers=_call_headers(opts)) as resp:
                content = await resp.read()
                if resp.status >= 400:
                    raise status_error(self.name, resp.status, resp.headers.get("retry-after"), content)
        except TimeoutError:
            raise BackendError("timeout", f"{self.name}: timeout") from None
        except _CONNECT_ERRORS as exc:
            raise BackendError("connect", f"{self.name}: {type(exc).__name__}") from None
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise BackendError("protocol", f"{self.name}: answer is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get(list_key), list):
            raise BackendError("protocol", f"{self.name}: answer is not {what}")
        return data

    async def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]:
        try:
            resp = await self._client().post(
                self.url, data=self._payload(body, True), timeout=self._timeout(opts, True), headers=_call_headers(opts)
            )
        except TimeoutError:
            raise BackendError("timeout", f"{self.name}: timeout") from None
        except _CONNECT_ERRORS as exc:
            raise BackendError("connect", f"{self.name}: {type(exc).__name__}") from None
        finished = False
        reader = self._reader(body)
        try:
            if resp.status >= 400:
                content = await resp.read()
                raise status_error(self.name, resp.status, resp.headers.get("retry-after"), content)
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype and "application/json" not in ctype:
                raise BackendError("protocol", f"{self.name}: unexpected content-type {ctype[:40]!r}")
            # Lines are split here from whatever each read brings, not with aiohttp's readline:
            # one await per read instead of two per event (the data line and the blank line).
            buf = bytearray()
            async for data in _then_newline(resp.content.iter_any()):
                buf += data
                start = 0
                while (end := buf.find(b"\n", start)) >= 0:
                    line = bytes(buf[start:end]).strip()
                    start = end + 1
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if reader is None:
                        if payload == b"[DONE]":
                            finished = True
                            break
                        yield self._event(payload)
                        continue
                    for chunk in reader.feed(self._json(payload)):
                        yield chunk
                    if reader.finished:
                        finished = True
                        break
                if finished:
                    break
                del buf[:start]
                if len(buf) > _MAX_LINE:
                    raise BackendError("protocol", f"{self.name}: stream line too long")
            if not finished:
                last = "[DONE]" if reader is None else "its end event"
                raise BackendError("protocol", f"{self.name}: stream ended without {last}")
        except TimeoutError:
            raise BackendError("timeout", f"{self.name}: stream timeout") from None
        except _CONNECT_ERRORS as exc:
            raise BackendError("connect", f"{self.name}: stream {type(exc).__name__}") from None
        finally:
            if finished:
                # The body's chunked terminator may still trail [DONE]: drain it off the answer's
                # critical path, or aiohttp drops the connection instead of pooling it (a new
                # connection, and TLS handshake, per stream).
                task = asyncio.get_running_loop().create_task(_drain_and_release(resp))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            else:
                resp.close()  # abandoned mid-answer: never reuse a half-read connection

    async def embed(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        """POST {api_base}/embeddings; `body["model"]` is the target's embedding model."""
        payload = orjson.dumps({**body, "model": str(body["model"]).removeprefix("openai/")})
        return await self._post_json(self.embeddings_url, payload, opts, "data", "an embeddings list")

    def _reader(self, body: dict[str, Any]) -> StreamReader | None:
        """What turns this target's stream events (for `body`) into chat chunks; None: they are
        chat chunks already, ended by `[DONE]` (the hot path: no translation)."""
        return None

    def _json(self, payload: bytes) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise BackendError("protocol", f"{self.name}: invalid JSON in stream") from None

    def _event(self, payload: bytes) -> dict[str, Any]:
        chunk = self._json(payload)
        if isinstance(chunk, dict) and "error" in chunk:
            raise BackendError("protocol", f"{self.name}: error event in stream")
        return chunk

    async def aclose(self) -> None:
        for task in list(self._draining):
            task.cancel()
        if self._session is not None:
            await self._session.close()


async def _drain_and_release(resp: aiohttp.ClientResponse) -> None:
    try:
        async with asyncio.timeout(_TRAILER_WAIT_S):
            await resp.content.read()
    except (TimeoutError, asyncio.CancelledError, *_CONNECT_ERRORS):
        resp.close()  # no clean end: close rather than reuse
        return
    resp.release()
