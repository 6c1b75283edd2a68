"""The seam between a wire format and the pipeline: what each adapter provides."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from gateway.schema import APIError
from gateway.wire.passthrough import NativeAPI, native_events

Event = dict[str, Any]
R = TypeVar("R", bound=BaseModel)  # a wire format's request model


class StreamTranslator(ABC):
    """Turns the pipeline's chat chunks (restored, in order) into one API's stream events.

    `feed` takes each chunk (an `{"error": ...}` dict when the stream broke for good); `finish`
    closes the stream. Together they emit exactly one terminal event."""

    @abstractmethod
    def feed(self, chunk: dict[str, Any]) -> list[Event]: ...

    @abstractmethod
    def finish(self) -> list[Event]: ...


class ChatChunkTranslator(StreamTranslator):
    """What every translator does with a chat chunk: take the first event from it, end on an
    `{"error": ...}` chunk, keep the usage and finish reason, hand choice 0's text and tool-call
    deltas on. Subclasses say what each of those becomes in their API's events."""

    def __init__(self) -> None:
        self.done = False
        self.usage = (0, 0)
        self.finish_reason: str | None = None
        self.stop_string: str | None = None  # the choice's `stop_reason` (vLLM's): the stop string that matched

    @abstractmethod
    def _start(self, events: list[Event], chunk: dict[str, Any]) -> Any:
        """The opening events, once (the chunk says the model)."""

    @abstractmethod
    def _text(self, events: list[Event], text: str) -> None: ...

    @abstractmethod
    def _tool(self, events: list[Event], call: dict[str, Any]) -> None: ...

    @abstractmethod
    def _close(self, events: list[Event]) -> None:
        """Ends the open content block or output item, if any."""

    @abstractmethod
    def _fail(self, events: list[Event], message: str) -> None:
        """The terminal event of a stream that broke for good."""

    @abstractmethod
    def _end(self, events: list[Event]) -> None:
        """The terminal event of a stream that finished, after `_close`."""

    def _native(self, events: list[Event], event: Event) -> None:
        """An upstream event of the client's own API (a pass-through stream), restored already:
        sent on as it is, the translator's state kept in step with it, so a continuation from a
        target of another API (a resumed stream) carries on in the same message or response."""
        raise NotImplementedError(f"{type(self).__name__} has no pass-through")

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if self.done:
            return []
        events: list[Event] = []
        native = native_events(chunk)
        if native is not None:  # its chat side is the same answer: the events say it whole
            for event in native:
                if not self.done:
                    self._native(events, event)
            return events
        self._start(events, chunk)
        if isinstance(chunk.get("error"), dict) and not chunk.get("choices"):
            self.done = True
            self._fail(events, str(chunk["error"].get("message") or ""))
            return events
        if chunk.get("usage"):
            self.usage = chat_usage(chunk)
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text(events, delta["content"])
            for call in delta.get("tool_calls") or []:
                self._tool(events, call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                self.stop_string = choice["stop_reason"] if isinstance(choice.get("stop_reason"), str) else None
        return events

    def finish(self) -> list[Event]:
        if self.done:
            return []
        events: list[Event] = []
        self._start(events, {})
        self._close(events)
        self.done = True
        self._end(events)
        return events


class OpenModel(BaseModel):
    """A request model that accepts the fields it does not use (cache_control, citations...)."""

    model_config = ConfigDict(extra="allow")


def _as_it_came(answer: dict[str, Any], request: Any) -> dict[str, Any]:
    return answer


def _gateway_error(err: APIError) -> dict[str, Any]:
    return err.body()


@dataclass(frozen=True)
class WireAdapter(Generic[R]):
    """One wire format: its request model, the conversions, its error shape. A record of the
    format's functions: each adapter module builds one."""

    endpoint: str  # the path, also the label of the audit line
    request_model: type[R]
    to_chat: Callable[[R], dict[str, Any]]
    """The chat-completions body the pipeline runs on. Raises APIError(400) for what it cannot express."""
    from_chat: Callable[[dict[str, Any], R], dict[str, Any]]
    """The API's answer object from the (restored) chat completion."""
    translator: Callable[[R, int, str], StreamTranslator]
    """(request, input_tokens, request_id): `input_tokens` is the prompt's size before any answer (the
    target's count, or an estimate); `request_id` the x-request-id, for an error event that names it."""
    native_answer: Callable[[dict[str, Any], R], dict[str, Any]] = _as_it_came
    """A same-API upstream's own answer (pass-through, restored) as this API's answer: as it came,
    completed with what the published schema requires."""
    error_body: Callable[[APIError], dict[str, Any]] = _gateway_error
    api: NativeAPI | None = None  # a target of this API (`api:` in the policy) gets the client's own body

    def parse(self, data: dict[str, Any]) -> R:
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
    errors = exc.errors()
    first: Mapping[str, Any] = errors[0] if errors else {}
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *first.get("loc", ())))
    msg = first.get("msg", "Invalid request")
    return APIError(400, f"Invalid request: {loc + ': ' if loc else ''}{msg}", param=loc or None,
                    code="invalid_value")


def bad(message: str, param: str) -> APIError:
    """A 400 for a value the conversion cannot express, naming where it is."""
    return APIError(400, f"Invalid request: {param}: {message}", param=param, code="invalid_value")


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

