"""The chat hub out to an OpenAI Responses upstream (a target with `api: responses`), and back.

As gateway/wire/to_messages.py: the (redacted) chat body becomes a stateless Responses request
(`store: false`), the upstream's `response` object or stream events become chat completions /
chunks for the pipeline to restore. Pure; the HTTP is gateway/backends/wire_http.py.

Out: system and developer messages -> `instructions`; user / assistant messages -> message items
(input_text / input_image parts); assistant `tool_calls` -> `function_call` items; `role: tool`
-> `function_call_output` items; function tools, `tool_choice`, `response_format` -> `text.format`,
`max_tokens` -> `max_output_tokens`. `stop` and `seed` have no Responses equivalent and are not
sent. A trailing assistant message (a resumed answer) is sent as the last input item: the
Responses API has no "continue this message", so only set `continues_answers` on such a target
if its model does continue it.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.backends.base import BackendError
from gateway.classify.text import content_text
from gateway.wire import passthrough
from gateway.wire.base import new_id
from gateway.wire.chat_parts import (
    assistant_message,
    chat_completion,
    chat_functions,
    function_call,
    split_system,
)


def _parts(content: Any) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    out: list[dict[str, Any]] = []
    for part in content or ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            out.append({"type": "input_text", "text": str(part.get("text") or "")})
        elif part.get("type") == "image_url":
            image = part.get("image_url") or {}
            one = {"type": "input_image", "image_url": str(image.get("url") or ""), "detail": "auto"}
            if image.get("detail") in ("low", "high", "auto"):
                one["detail"] = image["detail"]
            out.append(one)
    return out


def _format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema") or {}
        out = {"type": "json_schema", "name": schema.get("name") or "answer", "schema": schema.get("schema") or {}}
        for key in ("strict", "description"):
            if schema.get(key) is not None:
                out[key] = schema[key]
        return out
    return None


def _items(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """One chat message (not system) as input items: an assistant's text and each of its calls are
    items of their own."""
    if msg.get("role") == "tool":
        return [{"type": "function_call_output", "call_id": str(msg.get("tool_call_id") or ""),
                 "output": content_text(msg.get("content"))}]
    if msg.get("role") != "assistant":
        return [{"type": "message", "role": "user", "content": _parts(msg.get("content"))}]
    text = content_text(msg.get("content"))
    items = [{"type": "message", "role": "assistant", "content": text}] if text else []
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        items.append({"type": "function_call", "call_id": str(call.get("id") or new_id("call_")),
                      "name": str(fn.get("name") or ""), "arguments": str(fn.get("arguments") or "")})
    return items


def request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The Responses request for a chat body (already redacted where the rule says so)."""
    instructions, turns = split_system(body.get("messages") or [])
    items = [item for msg in turns for item in _items(msg)]
    out: dict[str, Any] = {"model": model, "input": items, "store": False}
    if instructions:
        out["instructions"] = instructions
    tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if tokens:
        out["max_output_tokens"] = tokens
    for name in ("temperature", "top_p", "parallel_tool_calls", "metadata", "user"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("tools"):
        out["tools"] = [{"type": "function", **fn} for fn in chat_functions(body["tools"])]
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            out["tool_choice"] = {"type": "function", "name": str((choice.get("function") or {}).get("name") or "")}
        elif choice in ("auto", "required", "none"):
            out["tool_choice"] = choice
    if (fmt := _format(body.get("response_format"))) is not None:
        out["text"] = {"format": fmt}
    if body.get("stream"):
        out["stream"] = True
    return out


# -- back ---------------------------------------------------------------------------------------


def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(response: dict[str, Any], calls: bool) -> str:
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if calls else "stop"


def _message_text(item: dict[str, Any]) -> str:
    return "".join(str(p.get("text") or p.get("refusal") or "") for p in item.get("content") or ()
                   if isinstance(p, dict) and p.get("type") in ("output_text", "refusal"))


def completion(response: dict[str, Any], name: str) -> dict[str, Any]:
    """A chat completion for an upstream `response`. Raises BackendError for anything else, or a
    response that failed."""
    if not isinstance(response, dict) or response.get("object") != "response" \
            or not isinstance(response.get("output"), list):
        raise BackendError("protocol", f"{name}: answer is not a Responses response")
    if response.get("status") == "failed":
        raise BackendError("status", f"{name}: response failed", status=500)
    items = [i for i in response["output"] if isinstance(i, dict)]
    texts = [_message_text(i) for i in items if i.get("type") == "message"]
    calls = [function_call(str(i.get("call_id") or new_id("call_")), str(i.get("name") or ""),
                           str(i.get("arguments") or "")) for i in items if i.get("type") == "function_call"]
    choice = {"index": 0, "message": assistant_message(texts, calls), "finish_reason": _finish(response, bool(calls)),
              "logprobs": None}
    return chat_completion(str(response.get("id") or new_id("resp_")), int(response.get("created_at") or time.time()),
                           str(response.get("model") or ""), choice, _usage(response.get("usage")))


_TERMINAL = ("response.completed", "response.incomplete")


class EventReader(passthrough.EventReader):
    """Responses stream events in, chat chunks out; `finished` after response.completed (or
    .incomplete). response.failed and `error` raise BackendError, as a broken stream does."""

    def __init__(self, name: str, native: bool = False) -> None:
        super().__init__(name, native, new_id("resp_"))

    def _feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "response.created":
            return [self._opened(event.get("response") or {})]
        if kind == "response.output_text.delta":
            return [self._chunk({"content": str(event.get("delta") or "")})]
        if kind == "response.output_item.added":
            item = event.get("item") or {}
            if item.get("type") != "function_call":
                return []
            k = self.tools.setdefault(int(event.get("output_index") or 0), len(self.tools))
            return [self._call_started(k, str(item.get("call_id") or new_id("call_")), str(item.get("name") or ""))]
        if kind == "response.function_call_arguments.delta":
            slot = self.tools.get(int(event.get("output_index") or 0))
            if slot is None:
                raise BackendError("protocol", f"{self.name}: arguments delta outside a function_call item")
            return [self._call_arguments(slot, str(event.get("delta") or ""))]
        if kind in _TERMINAL:
            self.finished = True
            response = event.get("response") or {}
            return [self._chunk({}, _finish(response, bool(self.tools))), self._usage_chunk(_usage(response.get("usage")))]
        if kind in ("response.failed", "error"):
            raise BackendError("status", f"{self.name}: {kind} in stream", status=500)
        return []  # in_progress, part / item done events, reasoning: nothing chat needs
