"""Anthropic Messages (POST /v1/messages) <-> the chat-completions body the pipeline runs on.

In: top-level `system` -> a system message; content blocks -> chat parts (`image` -> an
`image_url` data URL); `tool_use` blocks -> assistant `tool_calls`; `tool_result` blocks -> `role:
tool` messages (placed before the rest of their user turn, as chat requires); `tools`
(`input_schema`) -> function tools; `tool_choice` auto/any/tool/none; `stop_sequences` -> `stop`;
`metadata.user_id` -> `user`. Thinking blocks of earlier assistant turns have no chat equivalent and
are dropped. Out: a `Message` (text and `tool_use` blocks, `stop_reason`, usage in Anthropic's
names) or its stream events.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

from gateway.classify.text import content_text
from gateway.schema import APIError
from gateway.wire.base import (
    ChatChunkTranslator,
    Event,
    OpenModel,
    WireAdapter,
    arguments_object,
    bad,
    chat_usage,
    check,
    new_id,
    tool_calls_of,
)
from gateway.wire.passthrough import PROMPT_TOKENS

PATH = "/v1/messages"


class TextBlock(OpenModel):
    type: Literal["text"]
    text: str


class ImageSource(OpenModel):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(OpenModel):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(OpenModel):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(OpenModel):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(OpenModel):
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock,
                  Field(discriminator="type")]
_BLOCK: TypeAdapter[Any] = TypeAdapter(Block)


class MessageParam(OpenModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class ToolParam(OpenModel):
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]


_TOOL: TypeAdapter[ToolParam] = TypeAdapter(ToolParam)


class ToolChoice(OpenModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(OpenModel):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int = Field(ge=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None


# -- in -----------------------------------------------------------------------------------------


def _image_part(block: ImageBlock) -> dict[str, Any]:
    src = block.source
    url = src.url if src.type == "url" else f"data:{src.media_type or 'image/png'};base64,{src.data or ''}"
    return {"type": "image_url", "image_url": {"url": url or ""}}


def _tool_result(block: ToolResultBlock, where: str) -> dict[str, Any]:
    content: str | list[dict[str, Any]]
    if isinstance(block.content, list):
        if any(isinstance(b, ImageBlock) for b in block.content):
            raise bad("images inside a tool_result are not supported (chat tool results carry text only)", where)
        content = [{"type": "text", "text": b.text} for b in block.content if isinstance(b, TextBlock)]
    else:
        content = block.content or ""
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _user(content: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, raw in enumerate(content):
        where = f"messages.{i}.content.{j}"
        block = check(_BLOCK, raw, where)
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image_part(block))
        elif isinstance(block, ToolResultBlock):
            results.append(_tool_result(block, where))
        else:
            raise bad(f"a user message cannot hold a `{block.type}` block", where)
    return results + ([{"role": "user", "content": parts}] if parts else [])


def _assistant(content: list[dict[str, Any]], i: int) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, raw in enumerate(content):
        where = f"messages.{i}.content.{j}"
        block = check(_BLOCK, raw, where)
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif not isinstance(block, ThinkingBlock):  # thinking: no chat equivalent, dropped
            raise bad(f"an assistant message cannot hold a `{block.type}` block", where)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for k, raw in enumerate(tools):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in (None, "custom"):
            raise bad(f"server tools (`{str(kind)[:60]}`) are not supported; declare client tools with "
                       "name and input_schema", f"tools.{k}")
        tool = check(_TOOL, raw, f"tools.{k}")
        fn: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            fn["description"] = tool.description
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: ToolChoice, body: dict[str, Any]) -> None:
    if choice.type == "tool":
        if not choice.name:
            raise bad("`name` is required when type is `tool`", "tool_choice.name")
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use and choice.type != "none":
        body["parallel_tool_calls"] = False


def to_chat(req: MessagesRequest) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if isinstance(req.system, str) and req.system:
        messages.append({"role": "system", "content": req.system})
    elif isinstance(req.system, list) and req.system:
        messages.append({"role": "system", "content": "\n".join(b.text for b in req.system)})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            messages.extend(_user(m.content, i))
        else:
            messages.append(_assistant(m.content, i))
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens}
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    if req.tools:
        body["tools"] = _tools(req.tools)
    if req.tool_choice is not None and req.tools:
        _tool_choice(req.tool_choice, body)
    user_id = (req.metadata or {}).get("user_id")
    if isinstance(user_id, str) and user_id:
        body["user"] = user_id
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # message_delta reports the usage
    return body


# -- out ----------------------------------------------------------------------------------------

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
         "content_filter": "refusal"}


def stop_reason(finish_reason: str | None) -> str:
    return _STOP.get(finish_reason or "stop", "end_turn")


def matched_stop(finish_reason: str | None, stop_string: Any, stop_sequences: list[str] | None) -> str | None:
    """The stop sequence that ended the answer: the target's `stop_reason` (the engine's, vLLM's,
    a Messages upstream's), when it is one of the request's. None for end of turn, or a target
    that does not say (chat's finish_reason alone cannot tell a stop sequence from the end)."""
    if finish_reason != "stop" or not isinstance(stop_string, str) or not stop_sequences:
        return None
    return stop_string if stop_string in stop_sequences else None


# Fields the published schema requires of every answer, null where the gateway has nothing to say
# (no prompt cache, no server tools, no code-execution container, no refusal details).
_USAGE_NULLS = {"cache_creation": None, "cache_creation_input_tokens": None, "cache_read_input_tokens": None,
                "inference_geo": None, "server_tool_use": None, "service_tier": None}
_MESSAGE_NULLS = {"container": None, "stop_details": None}


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, **_USAGE_NULLS}


def _delta_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": None,
            "cache_read_input_tokens": None, "server_tool_use": None}


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "citations": None}


def _tool_use_block(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments, "caller": {"type": "direct"}}


def from_chat(response: dict[str, Any], req: MessagesRequest) -> dict[str, Any]:
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    stop = matched_stop(choice.get("finish_reason"), choice.get("stop_reason"), req.stop_sequences)
    content: list[dict[str, Any]] = []
    text = content_text(message.get("content"))
    if text:
        content.append(_text_block(text))
    for call in tool_calls_of(message):
        fn = call.get("function") or {}
        content.append(_tool_use_block(call.get("id") or new_id("toolu_"), fn.get("name") or "",
                                       arguments_object(fn.get("arguments"))))
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": response.get("model") or req.model,
        "content": content,
        "stop_reason": "stop_sequence" if stop else stop_reason(choice.get("finish_reason")),
        "stop_sequence": stop,
        "usage": _usage(*chat_usage(response)),
        **_MESSAGE_NULLS,
    }


def _native_block(block: Any) -> Any:
    """An upstream's content block with the fields the published schema requires."""
    if not isinstance(block, dict):
        return block
    if block.get("type") == "text":
        return {"citations": None, **block}
    if block.get("type") == "tool_use":
        return {"caller": {"type": "direct"}, **block}
    return block


def native_message(message: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic upstream's own `Message` (a pass-through answer), as it came, completed with
    what the published schema requires and a lax upstream left out (null: nothing to say)."""
    out = {**_MESSAGE_NULLS, "stop_reason": None, "stop_sequence": None, **message}
    out["usage"] = {**_USAGE_NULLS, "input_tokens": 0, "output_tokens": 0, **(message.get("usage") or {})}
    if isinstance(message.get("content"), list):
        out["content"] = [_native_block(b) for b in message["content"]]
    return out


def native_event(event: Event) -> Event:
    """An upstream stream event, completed as `native_message` completes a message."""
    kind = event.get("type")
    if kind == "message_start" and isinstance(event.get("message"), dict):
        return {**event, "message": native_message(event["message"])}
    if kind == "content_block_start":
        return {**event, "content_block": _native_block(event.get("content_block"))}
    if kind == "message_delta":
        usage = {"input_tokens": None, "cache_creation_input_tokens": None, "cache_read_input_tokens": None,
                 "server_tool_use": None, "output_tokens": 0, **(event.get("usage") or {})}
        return {**event, "delta": {**_MESSAGE_NULLS, "stop_sequence": None, **(event.get("delta") or {})},
                "usage": usage}
    return event


class MessagesStream(ChatChunkTranslator):
    """Chat chunks -> message_start, content_block_start/delta/stop, message_delta, message_stop
    (or one `error` event when the stream broke and no target could finish it)."""

    def __init__(self, model: str, stop_sequences: list[str] | None = None, input_tokens: int = 0,
                 request_id: str | None = None) -> None:
        super().__init__()
        self.request_id = request_id
        self.model = model
        self.stop_sequences = stop_sequences
        self.input_tokens = input_tokens
        self.id = new_id("msg_")
        self.started = False
        self.index = -1
        self.open: tuple[str, int] | None = None  # ("text", 0) or ("tool", chat tool index)
        self.tools: dict[int, int] = {}  # chat tool-call index -> content block index

    def _start(self, events: list[Event], chunk: dict[str, Any]) -> None:
        if self.started:
            return
        self.started = True
        if isinstance(chunk.get(PROMPT_TOKENS), int):  # an Anthropic upstream's own count
            self.input_tokens = chunk[PROMPT_TOKENS]
        events.append({"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": chunk.get("model") or self.model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": _usage(self.input_tokens, 0),
            **_MESSAGE_NULLS}})

    def _close(self, events: list[Event]) -> None:
        if self.open is not None:
            events.append({"type": "content_block_stop", "index": self.index})
            self.open = None

    def _open(self, events: list[Event], key: tuple[str, int], block: dict[str, Any]) -> None:
        self._close(events)
        self.index += 1
        self.open = key
        events.append({"type": "content_block_start", "index": self.index, "content_block": block})

    def _fail(self, events: list[Event], message: str) -> None:
        self._close(events)
        events.append({"type": "error", "error": {"type": "api_error", "message": message},
                       "request_id": self.request_id})

    def _text(self, events: list[Event], text: str) -> None:
        if self.open != ("text", 0):
            self._open(events, ("text", 0), _text_block(""))
        events.append({"type": "content_block_delta", "index": self.index,
                       "delta": {"type": "text_delta", "text": text}})

    def _tool(self, events: list[Event], call: dict[str, Any]) -> None:
        k = int(call.get("index") or 0)
        fn = call.get("function") or {}
        if k not in self.tools:
            self._open(events, ("tool", k), _tool_use_block(call.get("id") or new_id("toolu_"), fn.get("name") or "", {}))
            self.tools[k] = self.index
        if fn.get("arguments"):
            events.append({"type": "content_block_delta", "index": self.tools[k],
                           "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}})

    def _native(self, events: list[Event], event: Event) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.started = True
        elif kind == "content_block_start":
            self.index = max(self.index, int(event.get("index") or 0))
            block = event.get("content_block") or {}
            # text that a resumed answer goes on with joins an open text block
            self.open = ("text", 0) if block.get("type") == "text" else ("native", self.index)
        elif kind == "content_block_stop":
            self.open = None
        elif kind == "message_stop":
            self.done = True
        events.append(native_event(event))

    def _end(self, events: list[Event]) -> None:
        inp, out = self.usage
        stop = matched_stop(self.finish_reason, self.stop_string, self.stop_sequences)
        events.append({"type": "message_delta",
                       "delta": {"stop_reason": "stop_sequence" if stop else stop_reason(self.finish_reason),
                                 "stop_sequence": stop, **_MESSAGE_NULLS},
                       "usage": _delta_usage(inp, out)})
        events.append({"type": "message_stop"})


# -- errors -------------------------------------------------------------------------------------

# The types of the SDK's ErrorResponse (it has none for 413: the status itself says it).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error",
                504: "timeout_error", 529: "overloaded_error"}


class ErrorObject(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """Anthropic's error shape (for the OpenAPI document)."""

    type: Literal["error"]
    error: ErrorObject
    request_id: str | None = None


def error_body(err: APIError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message},
            "request_id": err.headers.get("x-request-id")}


ANTHROPIC_MESSAGES = WireAdapter(
    endpoint=PATH, request_model=MessagesRequest, api="messages", to_chat=to_chat, from_chat=from_chat,
    translator=lambda req, input_tokens, request_id: MessagesStream(req.model, req.stop_sequences, input_tokens,
                                                                    request_id),
    native_answer=lambda answer, req: native_message(answer), error_body=error_body)
