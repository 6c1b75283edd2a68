"""Chat-completion chunks put back together as the one `chat.completion` a non-streamed call returns.

The dispatcher streams a non-streamed request internally when its target has slowness limits: a
first token can only be timed, and a stall only seen, in a stream. The client asked for one JSON
answer, and gets exactly that shape: text fields concatenated per choice, tool calls merged by
their index (arguments concatenated, as the OpenAI SDK's own stream accumulator does), the last
finish_reason, the usage chunk (asked for with `stream_options.include_usage`), and the answer's
id, created, model and system_fingerprint. A pass-through stream's upstream events are kept, in
order, under `NATIVE` (gateway/stages/restore.py makes the upstream's own answer of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.wire.passthrough import NATIVE, native_events

# Top-level fields of a chunk that describe the whole answer. Others (e.g. OpenAI's per-chunk
# `obfuscation` padding) belong to the chunk, not to the answer.
_IDENTITY = ("id", "created", "model", "system_fingerprint", "service_tier")
# Delta fields whose text arrives in pieces (reasoning_content: DeepSeek and vLLM; reasoning:
# OpenRouter and Ollama).
_TEXT = ("content", "refusal", "reasoning_content", "reasoning")


@dataclass
class _Choice:
    text: dict[str, list[str]] = field(default_factory=dict)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    function_call: dict[str, str] | None = None  # the legacy single call
    finish_reason: str | None = None
    logprobs: dict[str, list[Any]] | None = None

    def feed(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        for key in _TEXT:
            piece = delta.get(key)
            if isinstance(piece, str):
                self.text.setdefault(key, []).append(piece)
        for call in delta.get("tool_calls") or ():
            self._merge_call(call)
        fn = delta.get("function_call")
        if isinstance(fn, dict):
            acc = self.function_call = self.function_call or {"name": "", "arguments": ""}
            for key in ("name", "arguments"):
                if isinstance(fn.get(key), str):
                    acc[key] += fn[key]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            acc_lp = self.logprobs = self.logprobs or {}
            for key in ("content", "refusal"):
                if isinstance(logprobs.get(key), list):
                    acc_lp.setdefault(key, []).extend(logprobs[key])

    def _merge_call(self, call: dict[str, Any]) -> None:
        index = call.get("index", len(self.tool_calls))
        acc = self.tool_calls.setdefault(index, {"id": "", "type": "function",
                                                 "function": {"name": "", "arguments": ""}})
        if call.get("id") and not acc["id"]:  # some providers repeat the id on every delta
            acc["id"] = call["id"]
        if call.get("type"):
            acc["type"] = call["type"]
        fn = call.get("function") or {}
        for key in ("name", "arguments"):
            if isinstance(fn.get(key), str):
                acc["function"][key] += fn[key]

    def joined(self, key: str) -> str | None:
        return "".join(self.text[key]) if key in self.text else None

    def message(self) -> dict[str, Any]:
        content = self.joined("content")
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        msg: dict[str, Any] = {
            "role": "assistant",
            # As the API answers: null beside tool calls with no text, "" for an empty answer.
            "content": content or (None if calls or self.function_call else ""),
            "refusal": self.joined("refusal") or None,
        }
        for key in ("reasoning_content", "reasoning"):
            if self.joined(key):
                msg[key] = self.joined(key)
        if calls:
            msg["tool_calls"] = calls
        if self.function_call is not None:
            msg["function_call"] = self.function_call
        return msg


class Assembler:
    """Feed it every chunk of one stream, in order; `completion()` is the answer so far."""

    def __init__(self) -> None:
        self._identity: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None
        self.native: list[dict[str, Any]] | None = None  # a pass-through stream's upstream events

    def feed(self, chunk: dict[str, Any]) -> None:
        for key in _IDENTITY:
            if chunk.get(key) is not None and key not in self._identity:
                self._identity[key] = chunk[key]
        for choice in chunk.get("choices") or ():
            self._choices.setdefault(choice.get("index", 0), _Choice()).feed(choice)
        if chunk.get("usage"):
            self.usage = chunk["usage"]  # the last wins: some servers send running totals
        if (events := native_events(chunk)) is not None:
            self.native = [*(self.native or ()), *events]

    def completion(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self._identity.get("id", ""),
            "object": "chat.completion",
            "created": self._identity.get("created", 0),
            "model": self._identity.get("model", ""),
            "choices": [
                {
                    "index": i,
                    "message": c.message(),
                    # A stream always ends a choice with a reason; one cut without it ended anyway.
                    "finish_reason": c.finish_reason or "stop",
                    "logprobs": {"content": None, "refusal": None, **c.logprobs} if c.logprobs else None,
                }
                for i, c in sorted(self._choices.items())
            ],
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in self._identity:
                out[key] = self._identity[key]
        if self.usage is not None:
            out["usage"] = self.usage
        if self.native is not None:
            out[NATIVE] = self.native
        return out


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    asm = Assembler()
    for chunk in chunks:
        asm.feed(chunk)
    return asm.completion()


def streaming_body(body: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed request's body, asked for as a stream that ends with its usage."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}
