"""A direct OpenAI-compatible HTTP backend (httpx), for targets that speak the OpenAI API.

Most providers behind an aggregator, and every local server (llama.cpp, vLLM, Ollama), speak the
OpenAI wire format; talking to them directly costs far less per call than going through litellm
(see benchmarks/gateway_overhead.py) and lets us see the raw status, headers and bytes, which is
what the fallback logic needs. Every other provider goes through `LitellmBackend`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from gateway.backends.base import BackendError, CallOptions
from gateway.backends.errors import status_error


class OpenAIHTTPBackend:
    def __init__(
        self,
        name: str,
        *,
        model: str,
        api_base: str,
        api_key: str | None,
        timeout_s: float,
        extra_body: dict[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.model = model.removeprefix("openai/")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.timeout_s = timeout_s
        self.extra_body = extra_body or {}
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            transport=transport,
            trust_env=False,  # never route loopback test traffic or device traffic through a proxy env
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
        )

    def _timeout(self, opts: CallOptions) -> httpx.Timeout:
        left = opts.deadline - time.monotonic()
        if left <= 0:
            raise BackendError("timeout", f"deadline passed before calling {self.name}")
        t = min(self.timeout_s, left)
        return httpx.Timeout(t, connect=min(t, 10.0))

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
        try:
            resp = await self._client.post(
                self.url, content=self._payload(body, False), timeout=self._timeout(opts)
            )
        except httpx.TimeoutException as exc:
            raise BackendError("timeout", f"{self.name}: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise BackendError("connect", f"{self.name}: {type(exc).__name__}") from None
        if resp.status_code >= 400:
            raise status_error(self.name, resp.status_code, resp.headers.get("retry-after"), resp.content)
        try:
            data = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise BackendError("protocol", f"{self.name}: answer is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise BackendError("protocol", f"{self.name}: answer is not a chat completion")
        return data

    async def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]:
        timeout = self._timeout(opts)
        request = self._client.build_request(
            "POST", self.url, content=self._payload(body, True), timeout=timeout
        )
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise BackendError("timeout", f"{self.name}: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise BackendError("connect", f"{self.name}: {type(exc).__name__}") from None
        try:
            if resp.status_code >= 400:
                content = await resp.aread()
                raise status_error(self.name, resp.status_code, resp.headers.get("retry-after"), content)
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype and "application/json" not in ctype:
                raise BackendError("protocol", f"{self.name}: unexpected content-type {ctype[:40]!r}")
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise BackendError("protocol", f"{self.name}: invalid JSON in stream") from None
                if isinstance(chunk, dict) and "error" in chunk:
                    raise BackendError("protocol", f"{self.name}: error event in stream")
                yield chunk
            if not done:
                raise BackendError("protocol", f"{self.name}: stream ended without [DONE]")
        except httpx.TimeoutException as exc:
            raise BackendError("timeout", f"{self.name}: stream {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise BackendError("connect", f"{self.name}: stream {type(exc).__name__}") from None
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

