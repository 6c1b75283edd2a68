"""Direct HTTP backends for targets that speak another wire format than chat completions
(`api: messages` or `api: responses` in the policy).

They take the pipeline's chat body like every backend (already redacted for the cloud), send it
in the target's own format, and give back chat completions and chunks, so restoration, fallback,
hedging and mid-stream resume work unchanged. The conversions are gateway/wire/to_messages.py and
to_responses.py; the connection handling, error mapping and SSE line splitting are
OpenAIHTTPBackend's.

A body that carries the client's own request in the target's API (gateway/wire/passthrough.py:
a Messages client to a Messages target) is sent as that request instead, model replaced, and the
upstream's own answer (or each stream event) rides back on the chat completion (chunks) it
became, for the client's adapter to answer with.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.backends.base import CallOptions
from gateway.backends.openai_http import OpenAIHTTPBackend, StreamReader
from gateway.wire import to_messages, to_responses
from gateway.wire.passthrough import NATIVE


def _native(body: dict[str, Any]) -> dict[str, Any] | None:
    native = body.get(NATIVE)
    return native if isinstance(native, dict) else None


class MessagesHTTPBackend(OpenAIHTTPBackend):
    """An Anthropic Messages upstream: POST {api_base}/messages, `x-api-key` auth."""

    supports_embeddings = False  # the Messages API has no embeddings

    def __init__(self, name: str, *, model: str, api_base: str, api_key: str | None, timeout_s: float,
                 extra_body: dict[str, Any] | None = None) -> None:
        super().__init__(name, model=model, api_base=api_base, api_key=api_key, timeout_s=timeout_s,
                         extra_body=extra_body)
        self.model = self.model.removeprefix("anthropic/")
        self.url = api_base.rstrip("/") + "/messages"
        self._headers = {"Content-Type": "application/json", "anthropic-version": to_messages.ANTHROPIC_VERSION}
        if api_key:
            self._headers["x-api-key"] = api_key

    def _payload(self, body: dict[str, Any], stream: bool) -> bytes:
        native = _native(body)
        request = to_messages.request(body, self.model) if native is None \
            else {**to_messages.sanitise_native(native), "model": self.model}
        return orjson.dumps({**request, **self.extra_body, "stream": stream})

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        data = await self._post_json(self.url, self._payload(body, False), opts, "content", "an Anthropic message")
        native = _native(body)
        ids = to_messages.tool_ids(native if native is not None else body)
        answer = to_messages.completion(data, self.name, ids)
        if native is not None:
            answer[NATIVE] = data
        return answer

    def _reader(self, body: dict[str, Any]) -> StreamReader:
        native = _native(body)
        return to_messages.EventReader(self.name, native=native is not None,
                                       ids=to_messages.tool_ids(native if native is not None else body))


class ResponsesHTTPBackend(OpenAIHTTPBackend):
    """An OpenAI Responses upstream: POST {api_base}/responses, stateless (`store: false`)."""

    def __init__(self, name: str, *, model: str, api_base: str, api_key: str | None, timeout_s: float,
                 extra_body: dict[str, Any] | None = None) -> None:
        super().__init__(name, model=model, api_base=api_base, api_key=api_key, timeout_s=timeout_s,
                         extra_body=extra_body)
        self.url = api_base.rstrip("/") + "/responses"

    def _payload(self, body: dict[str, Any], stream: bool) -> bytes:
        native = _native(body)
        # Stateless either way: the gateway keeps no responses, and neither should the upstream.
        request = to_responses.request(body, self.model) if native is None \
            else {**native, "model": self.model, "store": False}
        return orjson.dumps({**request, **self.extra_body, "stream": stream})

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        data = await self._post_json(self.url, self._payload(body, False), opts, "output", "a Responses response")
        answer = to_responses.completion(data, self.name)
        if _native(body) is not None:
            answer[NATIVE] = data
        return answer

    def _reader(self, body: dict[str, Any]) -> StreamReader:
        return to_responses.EventReader(self.name, native=_native(body) is not None)
