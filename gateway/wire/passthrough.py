"""Same-API pass-through: the client's own body, for a target that speaks the client's API.

A Messages request to an `api: messages` target (or a Responses request to an `api: responses`
target) is not sent as the chat body the pipeline runs on: that round trip loses what chat has no
place for (`top_k`, `cache_control`, thinking blocks, `metadata`, ...). The internal request
stays the one chat body every stage reads; the client's own body rides beside it as an opaque
part that only the same-API backend opens (gateway/backends/wire_http.py), redacted in that
API's own positions (gateway/privacy/native.py).

On the way to the backend the part travels inside the body under `NATIVE`; `gateway/stages/targets.py`
puts it there for a same-API target only, so no other backend ever sees it. On the way back,
the backend's chat completion (and each stream chunk) carries the upstream's own answer (or the
stream events the chunk came from) under the same key, for the client's adapter to answer with.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from gateway.backends.base import BackendError

NativeAPI = Literal["messages", "responses"]

# The key of the pass-through part, in a body to a same-API backend and in its answers. Not a
# field of any API: nothing sends it out (the backends pop it) or answers with it.
NATIVE = "_hybrid_native"
# On the first chunk of a translated Anthropic stream: the upstream's own count of the prompt,
# which a Messages client's `message_start` reports (the chunk's `usage` comes at the end only).
PROMPT_TOKENS = "_hybrid_prompt_tokens"
INTERNAL = "_hybrid_"  # the prefix of those keys: the chat adapter never answers with them


@dataclass(frozen=True)
class Passthrough:
    """The client's own request body, in its API (as parsed from JSON: unknown fields kept)."""

    api: NativeAPI
    body: dict[str, Any]


def native_events(chunk: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The upstream stream events a chunk came from; None for a chunk of a translated stream."""
    events = chunk.get(NATIVE)
    return events if isinstance(events, list) else None


def carry(chunks: list[dict[str, Any]], like: dict[str, Any] | None, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`chunks` (the caller's own: marked in place) marked as a pass-through stream's (`NATIVE` on
    each, so no adapter translates their chat side), with `events` on the last one (on a chunk
    without choices when none)."""
    if not chunks:
        if not events:
            return []
        head = {k: v for k, v in (like or {}).items() if k in ("id", "object", "created", "model")}
        chunks = [{**head, "choices": []}]
    for chunk in chunks[:-1]:
        chunk[NATIVE] = []
    chunks[-1][NATIVE] = events
    return chunks


def internal(chunk: dict[str, Any]) -> dict[str, Any]:
    """The internal keys of a chunk (to put back on it after the chat normaliser dropped them)."""
    return {k: v for k, v in chunk.items() if k.startswith(INTERNAL)}


class EventReader(ABC):
    """Another API's stream events in, chat chunks out (gateway/wire/to_*.py); `finished` once the
    API's end event came. For a pass-through stream (`native`), each event rides on the chunks it
    became (on a chunk without choices when it became none), so none is lost."""

    def __init__(self, name: str, native: bool, first_id: str) -> None:
        self.name = name
        self.native = native  # a pass-through stream: each event rides on the chunks it became
        self.finished = False
        self.id = first_id  # until the upstream's first event names its own
        self.model = ""
        self.created = int(time.time())
        self.tools: dict[int, int] = {}  # the upstream's block / item index -> chat tool-call index

    def feed(self, event: Any) -> list[dict[str, Any]]:
        if not isinstance(event, dict):
            raise BackendError("protocol", f"{self.name}: stream event is not an object")
        chunks = self._feed(event)
        if not self.native:
            return chunks
        return carry(chunks, self._head(), [event])

    @abstractmethod
    def _feed(self, event: dict[str, Any]) -> list[dict[str, Any]]: ...

    # The chat chunks an upstream's events become, all with the stream's one id, created and model.

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**self._head(),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}]}

    def _opened(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The first chunk, from the upstream's opening event's answer (it names the id and model)."""
        self.id = str(answer.get("id") or self.id)
        self.model = str(answer.get("model") or "")
        return self._chunk({"role": "assistant", "content": ""})

    def _usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage}

    def _call_started(self, index: int, call_id: str, name: str) -> dict[str, Any]:
        return self._chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})

    def _call_arguments(self, index: int, arguments: str) -> dict[str, Any]:
        return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})


# -- an answer from its stream, for a whole answer the dispatcher read as a stream (assemble.py) ---


def _message_from_events(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """An Anthropic `Message` from its stream events, as the SDK's accumulator builds it."""
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    inputs: dict[int, list[str]] = {}
    for event in events:
        kind, index = event.get("type"), event.get("index")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = {**event["message"], "content": []}
        elif kind == "content_block_start" and isinstance(index, int) and isinstance(event.get("content_block"), dict):
            blocks[index] = dict(event["content_block"])
        elif kind == "content_block_delta" and isinstance(index, int) and index in blocks:
            delta, block = event.get("delta") or {}, blocks[index]
            if delta.get("type") in ("text_delta", "thinking_delta"):
                key = str(delta["type"]).removesuffix("_delta")
                block[key] = str(block.get(key) or "") + str(delta.get(key) or "")
            elif delta.get("type") == "signature_delta":
                block["signature"] = delta.get("signature")
            elif delta.get("type") == "input_json_delta":
                inputs.setdefault(index, []).append(str(delta.get("partial_json") or ""))
            elif delta.get("type") == "citations_delta":
                block["citations"] = [*(block.get("citations") or ()), delta.get("citation")]
        elif kind == "message_delta" and message is not None:
            message.update(event.get("delta") or {})
            usage = {k: v for k, v in (event.get("usage") or {}).items() if v is not None}
            message["usage"] = {**(message.get("usage") or {}), **usage}
    if message is None:
        return None
    for index, parts in inputs.items():
        try:
            blocks[index]["input"] = json.loads("".join(parts) or "{}")
        except ValueError:
            return None  # a cut tool input: no whole answer to give
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


def _response_from_events(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A Responses `response` from its stream: the terminal event carries it whole."""
    for event in reversed(events):
        if event.get("type") in ("response.completed", "response.incomplete") and isinstance(event.get("response"), dict):
            return dict(event["response"])
    return None


def answer_from_events(api: NativeAPI, events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The upstream's own answer from its stream events; None when they do not make a whole one."""
    return _message_from_events(events) if api == "messages" else _response_from_events(events)
