"""Chat completions out: every answer rebuilt to OpenAI's published `ChatCompletion` /
`ChatCompletionChunk` schema, whichever target wrote it (the engine, litellm, a raw upstream).

Upstream bodies are not forwarded as they came: the fields of the schema are rebuilt with their
types (`logprobs` and `message.refusal` null when absent, `system_fingerprint` a string or absent: the
published schema types it string, so an unknown one is left out rather than null; a foreign
`finish_reason` mapped to OpenAI's, ids and `created` fixed for the whole stream, even across a
mid-stream fallback to another target), and only fields the schema does not know pass through as
they are (a provider's extras). When the client asked for usage and the target sent none, the
last chunk (or the completion) carries an estimate: ~4 characters a token over the prompt's text
and the answer's (pipeline.estimate_tokens' rule); `x-hybrid-usage` says `estimated` then,
`reported` when the target counted (the engine counts with its own tokenizer).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from gateway.wire.passthrough import INTERNAL

# What OpenAI's schema allows; foreign values (Anthropic's, llama.cpp's) are mapped, else "stop".
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_FINISH_ALIASES = {"end_turn": "stop", "stop_sequence": "stop", "eos": "stop", "max_tokens": "length",
                   "tool_use": "tool_calls", "safety": "content_filter"}
SERVICE_TIERS = frozenset({"auto", "default", "flex", "scale", "priority"})
_ROLES = frozenset({"developer", "system", "user", "assistant", "tool"})
# Keys rebuilt below; any other key of an upstream object passes through unchanged.
_TOP = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"})
_CHOICE = frozenset({"index", "message", "delta", "finish_reason", "logprobs"})
_MESSAGE = frozenset({"role", "content", "refusal", "tool_calls"})

REPORTED = "reported"
ESTIMATED = "estimated"


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return default


def _finish(value: Any) -> str:
    if value in FINISH_REASONS:
        return str(value)
    return _FINISH_ALIASES.get(value, "stop") if isinstance(value, str) else "stop"


def _logprobs(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _extras(obj: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


def usage(value: Any) -> dict[str, Any] | None:
    """A `CompletionUsage`, or None when `value` is not one."""
    if not isinstance(value, dict):
        return None
    prompt, completion = _int(value.get("prompt_tokens")), _int(value.get("completion_tokens"))
    out = _extras(value, frozenset({"prompt_tokens", "completion_tokens", "total_tokens"}))
    out = {k: v for k, v in out.items() if v is None or isinstance(v, dict | int | float | str)}
    for key in ("prompt_tokens_details", "completion_tokens_details"):
        if key in out and not isinstance(out[key], dict):
            del out[key]
    total = _int(value.get("total_tokens"), prompt + completion)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total, **out}


def estimated_usage(prompt_tokens: int, answer_chars: int) -> dict[str, Any]:
    completion = (answer_chars + 3) // 4
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _tool_call(call: Any, i: int, streamed: bool) -> dict[str, Any] | None:
    if not isinstance(call, dict):
        return None
    raw_fn = call.get("function")
    fn: dict[str, Any] = raw_fn if isinstance(raw_fn, dict) else {}
    out = _extras(call, frozenset({"index", "id", "type", "function"}))
    function: dict[str, Any] = {}
    if isinstance(fn.get("name"), str):
        function["name"] = fn["name"]
    args = fn.get("arguments")
    if isinstance(args, str):
        function["arguments"] = args
    elif args is not None:  # an upstream that sends an object: the schema says JSON text
        function["arguments"] = orjson.dumps(args).decode()
    if streamed:
        out["index"] = _int(call.get("index"), i)
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        if call.get("type") is not None or "id" in out:
            out["type"] = "function"
        if function:
            out["function"] = function
        return out
    function.setdefault("name", "")
    function.setdefault("arguments", "")
    return {**out, "id": call["id"] if isinstance(call.get("id"), str) else f"call_{uuid.uuid4().hex[:24]}",
            "type": "function", "function": function}


def _tool_calls(value: Any, streamed: bool) -> list[dict[str, Any]] | None:
    if not isinstance(value, list) or not value:
        return None
    calls = [c for i, v in enumerate(value) if (c := _tool_call(v, i, streamed)) is not None]
    return calls or None


def _message(msg: Any) -> dict[str, Any]:
    msg = msg if isinstance(msg, dict) else {}
    out = {**_extras(msg, _MESSAGE), "role": "assistant", "content": _str_or_none(msg.get("content")),
           "refusal": _str_or_none(msg.get("refusal"))}
    if (calls := _tool_calls(msg.get("tool_calls"), streamed=False)) is not None:
        out["tool_calls"] = calls
    return out


def _answer_chars(message: dict[str, Any]) -> int:
    n = len(message.get("content") or "")
    for call in message.get("tool_calls") or ():
        n += len(call.get("function", {}).get("arguments") or "")
    return n


def _head(obj: dict[str, Any], object_: str, model: str) -> dict[str, Any]:
    # Internal keys (gateway/wire/passthrough.py) are the gateway's own: never answered with.
    extras = {k: v for k, v in _extras(obj, _TOP).items() if not k.startswith(INTERNAL)}
    out = {**extras, "id": obj["id"] if isinstance(obj.get("id"), str) and obj["id"]
           else f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": object_,
           "created": _int(obj.get("created"), int(time.time())),
           "model": obj["model"] if isinstance(obj.get("model"), str) and obj["model"] else model}
    if isinstance(obj.get("system_fingerprint"), str):  # the schema's type is string: absent, not null
        out["system_fingerprint"] = obj["system_fingerprint"]
    if obj.get("service_tier") in SERVICE_TIERS:
        out["service_tier"] = obj["service_tier"]
    return out


def completion(resp: dict[str, Any], *, model: str, prompt_tokens: int) -> tuple[dict[str, Any], str]:
    """The `ChatCompletion` for a target's answer, and where its usage came from (REPORTED or
    ESTIMATED). `model`: the name to use when the target gave none; `prompt_tokens`: the estimate
    of the prompt, used only when the target reported no usage."""
    out = _head(resp, "chat.completion", model)
    choices = []
    for i, choice in enumerate(c for c in resp.get("choices") or () if isinstance(c, dict)):
        choices.append({**_extras(choice, _CHOICE), "index": _int(choice.get("index"), i),
                        "message": _message(choice.get("message")), "finish_reason": _finish(choice.get("finish_reason")),
                        "logprobs": _logprobs(choice.get("logprobs"))})
    out["choices"] = choices
    reported = usage(resp.get("usage"))
    if reported is not None:
        out["usage"] = reported
        return out, REPORTED
    out["usage"] = estimated_usage(prompt_tokens, sum(_answer_chars(c["message"]) for c in choices))
    return out, ESTIMATED


def _delta(delta: Any) -> dict[str, Any]:
    delta = delta if isinstance(delta, dict) else {}
    out = _extras(delta, _MESSAGE)
    if delta.get("role") in _ROLES:
        out["role"] = delta["role"]
    for key in ("content", "refusal"):
        if key in delta:
            out[key] = _str_or_none(delta[key])
    if (calls := _tool_calls(delta.get("tool_calls"), streamed=True)) is not None:
        out["tool_calls"] = calls
    return out


class ChunkNormaliser:
    """Rebuilds one stream's chunks; `finish` gives the usage chunk the stream still owes."""

    def __init__(self, *, model: str, prompt_tokens: int, want_usage: bool) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.want_usage = want_usage
        self.usage_sent = False
        self.failed = False
        self.answer_chars = 0
        self._id: str | None = None
        self._created = 0
        self._fingerprint: str | None = None

    def chunk(self, c: dict[str, Any]) -> dict[str, Any]:
        if "error" in c and "choices" not in c:
            self.failed = True
            return c  # the stream's terminal error event: OpenAI's error shape already
        out = _head(c, "chat.completion.chunk", self.model)
        if self._id is None:  # one id, time and model for the whole stream, whoever writes it
            self._id, self._created, self.model = out["id"], out["created"], out["model"]
            self._fingerprint = out.get("system_fingerprint")
        out["id"], out["created"], out["model"] = self._id, self._created, self.model
        if self._fingerprint is not None:
            out["system_fingerprint"] = out.get("system_fingerprint") or self._fingerprint
        choices = []
        for i, choice in enumerate(x for x in c.get("choices") or () if isinstance(x, dict)):
            delta = _delta(choice.get("delta"))
            self.answer_chars += len(delta.get("content") or "") + sum(
                len(t.get("function", {}).get("arguments") or "") for t in delta.get("tool_calls") or ())
            fr = choice.get("finish_reason")
            choices.append({**_extras(choice, _CHOICE), "index": _int(choice.get("index"), i), "delta": delta,
                            "finish_reason": None if fr is None else _finish(fr),
                            "logprobs": _logprobs(choice.get("logprobs"))})
        out["choices"] = choices
        if (u := usage(c.get("usage"))) is not None:
            out["usage"] = u
            self.usage_sent = True
        return out

    def finish(self) -> dict[str, Any] | None:
        """The usage chunk, estimated, when the client asked for usage and no target sent it."""
        if not self.want_usage or self.usage_sent or self.failed or self._id is None:
            return None
        self.usage_sent = True
        owed = {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self.model,
                "choices": [], "usage": estimated_usage(self.prompt_tokens, self.answer_chars)}
        if self._fingerprint is not None:
            owed["system_fingerprint"] = self._fingerprint
        return owed


def sse(data: dict[str, Any]) -> bytes:
    """One chat completion chunk as a server-sent event."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
