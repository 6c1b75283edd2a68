"""The chat hub out to an Anthropic Messages upstream (a target with `api: messages`), and back.

The pipeline runs on the chat body, redacted where the rule says so; this module turns that body
into a Messages request (so the upstream sees exactly the redacted positions, in its own shape) and
the upstream's `Message` or stream events into chat completions / chunks, which the pipeline then
restores and the client's adapter writes in the client's API. Pure; the HTTP is
gateway/backends/wire_http.py.

Out: system messages -> top-level `system`; user parts -> text / image blocks; assistant
`tool_calls` -> `tool_use` blocks; `role: tool` messages -> `tool_result` blocks of one user turn;
`stop` -> `stop_sequences`; `tools` / `tool_choice` / `parallel_tool_calls`; `user` ->
`metadata.user_id`. A trailing assistant message (a resumed answer) is Anthropic's prefill, which
the model continues. `response_format` and `seed` have no Messages equivalent and are not sent.
Back: a stop sequence that ended the answer is the choice's `stop_reason` (vLLM's name for the
matched stop string), which the Messages adapter reports as `stop_sequence`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from gateway.backends.base import BackendError
from gateway.classify.text import content_text
from gateway.wire import passthrough
from gateway.wire.base import arguments_object, new_id
from gateway.wire.chat_parts import (
    assistant_message,
    chat_completion,
    chat_functions,
    function_call,
    split_system,
)
from gateway.wire.passthrough import PROMPT_TOKENS

ANTHROPIC_VERSION = "2023-06-01"
# Messages requires max_tokens; chat does not. What a request without one may write.
DEFAULT_MAX_TOKENS = 4096

_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")
_NOT_ID = re.compile(r"[^a-zA-Z0-9_-]")


def tool_id(raw: str) -> str:
    """A tool-call id as the Messages API takes it (`^[a-zA-Z0-9_-]+$`): unchanged when it is one,
    else its allowed characters and a hash of the whole, so the same id maps to the same one in
    every turn of a conversation and two ids never to one (`call.1` and `call:1` differ)."""
    if _TOOL_ID.fullmatch(raw):
        return raw
    return (_NOT_ID.sub("_", raw)[:40] or "toolu") + "_" + hashlib.sha256(raw.encode()).hexdigest()[:16]


def tool_ids(body: dict[str, Any]) -> dict[str, str]:
    """The ids of a request (a chat body or a client's Messages body) that `tool_id` rewrites:
    rewritten -> original, to give the client its own ids back in answers."""
    out: dict[str, str] = {}
    for msg in body.get("messages") or ():
        for call in msg.get("tool_calls") or () if isinstance(msg, dict) else ():
            raw = str(call.get("id") or "") if isinstance(call, dict) else ""
            if raw and (safe := tool_id(raw)) != raw:
                out[safe] = raw
        content = msg.get("content") if isinstance(msg, dict) else None
        for block in content if isinstance(content, list) else ():
            raw = str(block.get("id") or block.get("tool_use_id") or "") if isinstance(block, dict) else ""
            if raw and block.get("type") in ("tool_use", "tool_result") and (safe := tool_id(raw)) != raw:
                out[safe] = raw
    return out


_ID_KEYS = {"tool_use": "id", "tool_result": "tool_use_id"}


def sanitise_native(body: dict[str, Any]) -> dict[str, Any]:
    """A client's own Messages body with its tool ids made acceptable (a copy where any changed)."""
    changed = False
    messages = []
    for msg in body.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            blocks = []
            for block in content:
                key = _ID_KEYS.get(str(block.get("type"))) if isinstance(block, dict) else None
                if key is not None and isinstance(block.get(key), str) and tool_id(block[key]) != block[key]:
                    block = {**block, key: tool_id(block[key])}
                    changed = True
                blocks.append(block)
            msg = {**msg, "content": blocks}
        messages.append(msg)
    return {**body, "messages": messages} if changed else body


_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
           "tool_use": "tool_calls", "refusal": "content_filter"}


def _image_block(part: dict[str, Any]) -> dict[str, Any]:
    url = str((part.get("image_url") or {}).get("url") or "")
    if url.startswith("data:") and ";base64," in url:
        media_type, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type or "image/png", "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out: list[dict[str, Any]] = []
    for part in content or ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and part.get("text"):
            out.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            out.append(_image_block(part))
    return out


def _tool_result(msg: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id(str(msg.get("tool_call_id") or "")),
            "content": content_text(msg.get("content"))}


def _assistant(msg: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = _blocks(msg.get("content"))
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": tool_id(str(call.get("id") or new_id("toolu_"))),
                       "name": str(fn.get("name") or ""), "input": arguments_object(fn.get("arguments"))})
    return blocks


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Consecutive turns of one role are one Messages turn (the API alternates roles)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": fn["name"], "input_schema": fn["parameters"],
             **({"description": fn["description"]} if "description" in fn else {})} for fn in chat_functions(tools)]


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if isinstance(choice, dict):
        out: dict[str, Any] = {"type": "tool", "name": str((choice.get("function") or {}).get("name") or "")}
    elif choice in ("auto", "required", "none"):
        out = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    elif parallel is False:
        out = {"type": "auto"}
    else:
        return None
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The Messages request for a chat body (already redacted where the rule says so)."""
    system, turns = split_system(body.get("messages") or [])
    messages: list[dict[str, Any]] = []
    for msg in turns:
        role = msg.get("role")
        if role == "tool":
            _append(messages, "user", [_tool_result(msg)])
        elif role == "assistant":
            _append(messages, "assistant", _assistant(msg))
        else:
            _append(messages, "user", _blocks(msg.get("content")))
    if messages and messages[-1]["role"] == "assistant":
        # A prefill (a resumed answer): the API refuses one that ends in whitespace.
        blocks = messages[-1]["content"]
        if blocks[-1].get("type") == "text":
            blocks[-1]["text"] = blocks[-1]["text"].rstrip()
            if not blocks[-1]["text"]:
                blocks.pop()
        if not blocks:
            messages.pop()
    out: dict[str, Any] = {"model": model, "messages": messages,
                           "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
                           or DEFAULT_MAX_TOKENS}
    if system:
        out["system"] = system
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("temperature") is not None:
        out["temperature"] = min(1.0, float(body["temperature"]))  # Messages' range is 0..1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream"):
        out["stream"] = True
    return out


# -- back ---------------------------------------------------------------------------------------


def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    # Anthropic's input_tokens leaves out the cached part; chat's prompt_tokens counts all of it.
    prompt = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens",
                                                    "cache_read_input_tokens"))
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(stop_reason: Any) -> str:
    return _FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _call(block: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """A `tool_use` block as a chat tool call, under the client's own id (see tool_id)."""
    call_id = str(block.get("id") or new_id("toolu_"))
    return function_call(ids.get(call_id, call_id), str(block.get("name") or ""),
                         json.dumps(block.get("input") or {}, ensure_ascii=False))


def completion(message: dict[str, Any], name: str, ids: dict[str, str] | None = None) -> dict[str, Any]:
    """A chat completion for an upstream `Message`. Raises BackendError("protocol") for anything else."""
    if not isinstance(message, dict) or message.get("type") != "message" or not isinstance(message.get("content"), list):
        raise BackendError("protocol", f"{name}: answer is not an Anthropic message")
    blocks = [b for b in message["content"] if isinstance(b, dict)]
    texts = [str(b.get("text") or "") for b in blocks if b.get("type") == "text"]
    calls = [_call(b, ids or {}) for b in blocks if b.get("type") == "tool_use"]
    choice: dict[str, Any] = {"index": 0, "message": assistant_message(texts, calls),
                              "finish_reason": _finish(message.get("stop_reason")), "logprobs": None}
    if message.get("stop_reason") == "stop_sequence" and isinstance(message.get("stop_sequence"), str):
        choice["stop_reason"] = message["stop_sequence"]
    return chat_completion(str(message.get("id") or new_id("msg_")), int(time.time()), str(message.get("model") or ""),
                           choice, _usage(message.get("usage")))


class EventReader(passthrough.EventReader):
    """Anthropic stream events in, chat chunks out; `finished` once `message_stop` came.

    An `error` event (e.g. `overloaded_error` mid-stream) raises BackendError, so the pipeline
    retries, falls back or resumes as for any broken stream."""

    def __init__(self, name: str, native: bool = False, ids: dict[str, str] | None = None) -> None:
        super().__init__(name, native, new_id("msg_"))
        self.ids = ids or {}  # sanitised tool id -> the client's (see tool_id)
        self.usage: dict[str, Any] = {}

    def _feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.usage = dict(message.get("usage") or {})
            # The upstream's own count, for the message_start a Messages client is sent.
            return [{**self._opened(message), PROMPT_TOKENS: _usage(self.usage)["prompt_tokens"]}]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                k = self.tools.setdefault(int(event.get("index") or 0), len(self.tools))
                call_id = str(block.get("id") or new_id("toolu_"))
                return [self._call_started(k, self.ids.get(call_id, call_id), str(block.get("name") or ""))]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": str(delta.get("text") or "")})]
            if delta.get("type") == "input_json_delta":
                slot = self.tools.get(int(event.get("index") or 0))
                if slot is None:
                    raise BackendError("protocol", f"{self.name}: input_json_delta outside a tool_use block")
                return [self._call_arguments(slot, str(delta.get("partial_json") or ""))]
            return []  # thinking and signature deltas have no chat equivalent
        if kind == "message_delta":
            delta = event.get("delta") or {}
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            extra = {}
            if delta.get("stop_reason") == "stop_sequence" and isinstance(delta.get("stop_sequence"), str):
                extra["stop_reason"] = delta["stop_sequence"]
            return [self._chunk({}, _finish(delta.get("stop_reason")), **extra)]
        if kind == "message_stop":
            self.finished = True
            return [self._usage_chunk(_usage(self.usage))]
        if kind == "error":
            error = event.get("error") or {}
            status = 529 if error.get("type") == "overloaded_error" else 500
            raise BackendError("status", f"{self.name}: error event in stream ({str(error.get('type'))[:40]})",
                               status=status)
        return []  # ping, and event types added later
