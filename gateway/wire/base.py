"""The seam between a wire format and the pipeline: what each adapter provides."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from gateway.schema import APIError

Event = dict[str, Any]


class StreamTranslator(ABC):
    """Turns the pipeline's chat chunks (restored, in order) into one API's stream events.

    `feed` takes each chunk (an `{"error": ...}` dict when the stream broke for good); `finish`
    closes the stream. Together they emit exactly one terminal event."""

    @abstractmethod
    def feed(self, chunk: dict[str, Any]) -> list[Event]: ...

    @abstractmethod
    def finish(self) -> list[Event]: ...


class WireAdapter(ABC):
    """One wire format: its request model, the conversions, its error shape."""

    endpoint: str  # the path, also the label of the audit line
    request_model: type[BaseModel]

    @abstractmethod
    def to_chat(self, request: Any) -> dict[str, Any]:
        """The chat-completions body the pipeline runs on. Raises APIError(400) for what it
        cannot express."""

    @abstractmethod
    def from_chat(self, response: dict[str, Any], request: Any) -> dict[str, Any]:
        """The API's answer object from the (restored) chat completion."""

    @abstractmethod
    def translator(self, request: Any) -> StreamTranslator: ...

    @abstractmethod
    def error_body(self, err: APIError) -> dict[str, Any]: ...

    def parse(self, data: dict[str, Any]) -> Any:
        try:
            return self.request_model.model_validate(data)
        except ValidationError as exc:
            raise invalid(exc) from None


def sse_event(event: Event) -> bytes:
    """`event: <type>` then its JSON: both Anthropic's and the Responses API's stream framing."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def invalid(exc: ValidationError, prefix: str = "") -> APIError:
    """A 400 naming the first bad field, never quoting its value (it may be personal data)."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *first.get("loc", ())))
    msg = first.get("msg", "Invalid request")
    return APIError(400, f"Invalid request: {loc + ': ' if loc else ''}{msg}", param=loc or None,
                    code="invalid_value")


def check(adapter: TypeAdapter[Any], value: Any, where: str) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise invalid(exc, where) from None


def arguments_object(raw: str | None) -> dict[str, Any]:
    """Tool-call arguments (JSON text) as the object Anthropic's `tool_use.input` must be."""
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {"arguments": raw}  # a model's broken JSON is kept, not dropped
    return value if isinstance(value, dict) else {"arguments": value}


def chat_usage(response: dict[str, Any]) -> tuple[int, int]:
    usage = response.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def tool_calls_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
