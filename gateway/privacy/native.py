"""Redaction and restoration in the positions of an Anthropic Messages or OpenAI Responses body,
for a request passed through to a target of its own API (gateway/wire/passthrough.py).

The pipeline classifies and redacts the chat body the request was converted to, so the vault
already holds every value found in it; here the same vault's values are replaced in the client's
own body, position by position, one walker per API:

  Messages   `system` (string or text blocks), text blocks, `tool_use.input` (every string value),
             `tool_result` content (string or blocks), `thinking` text, plain-text `document`
             sources, tool descriptions (and the descriptions inside `input_schema`), `metadata`
  Responses  `instructions`, `input` (string or items: message parts, `function_call.arguments`
             (JSON: its string values), `function_call_output.output`, reasoning summaries),
             tool descriptions (and inside `parameters`), `metadata` values, `user`

Thinking text and reasoning summaries have no chat position, so they are not classified: they are
an earlier answer of the model itself (which saw placeholders), so their values are the ones the
vault knows when the conversation keeps one (x-hybrid-conversation-id); replacing them keeps an
Anthropic thinking block's signature valid, as the signed text was the redacted one.

Answers are restored in the same positions: whole (`restore_*`) or as stream events
(`*EventRestorer`), where each delta's text goes through a TextStream as chat chunks' do (a
placeholder cut across two deltas is held until whole) and what a block still holds is released
before its closing event.
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from gateway.privacy.restore import StreamRestorer, TextRestorer, TextStream
from gateway.privacy.vault import Vault
from gateway.privacy.walk import map_json_strings
from gateway.wire.passthrough import NATIVE, NativeAPI, carry

Fn = Callable[[str], str]
PartsFn = Callable[[list[str]], list[str]]
Event = dict[str, Any]


def _json_text(raw: Any, fn: Fn) -> Any:
    """JSON text (tool arguments) with `fn` applied to its string values; not JSON: to the text."""
    if not isinstance(raw, str):
        return raw
    try:
        parsed = json.loads(raw)
    except ValueError:
        return fn(raw)
    if not isinstance(parsed, dict | list):
        return fn(raw)
    return json.dumps(map_json_strings(parsed, fn), ensure_ascii=False)


def _descriptions(schema: Any, fn: Fn) -> Any:
    if isinstance(schema, dict):
        return {k: fn(v) if k == "description" and isinstance(v, str) else _descriptions(v, fn)
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_descriptions(v, fn) for v in schema]
    return schema


def _parts(parts: list[Any], keys: dict[str, str], fn: Fn, parts_fn: PartsFn | None) -> None:
    """A content list's text parts (`keys`: part type -> its text field), in place, together
    through `parts_fn` when given (a value may run across two of them)."""
    found = [(p, keys[p["type"]]) for p in parts
             if isinstance(p, dict) and p.get("type") in keys and isinstance(p.get(keys[p["type"]]), str)]
    texts = [p[k] for p, k in found]
    new = parts_fn(texts) if parts_fn is not None and len(texts) > 1 else [fn(t) for t in texts]
    for (part, key), text in zip(found, new, strict=True):
        part[key] = text


def _tools(tools: Any, fn: Fn, schema_key: str) -> None:
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        if isinstance(tool.get("description"), str):
            tool["description"] = fn(tool["description"])
        if schema_key in tool:
            tool[schema_key] = _descriptions(tool[schema_key], fn)


def _metadata(body: dict[str, Any], fn: Fn) -> None:
    if isinstance(body.get("metadata"), dict):
        body["metadata"] = {k: fn(v) if isinstance(v, str) else v for k, v in body["metadata"].items()}


# -- Anthropic Messages -------------------------------------------------------------------------

_MESSAGES_TEXT = {"text": "text"}


def _messages_blocks(blocks: list[Any], fn: Fn, parts_fn: PartsFn | None) -> None:
    _parts(blocks, _MESSAGES_TEXT, fn, parts_fn)
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "tool_use" and "input" in block:
            block["input"] = map_json_strings(block["input"], fn)
        elif kind == "tool_result":
            if isinstance(block.get("content"), str):
                block["content"] = fn(block["content"])
            elif isinstance(block.get("content"), list):
                _messages_blocks(block["content"], fn, parts_fn)
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            block["thinking"] = fn(block["thinking"])
        elif kind == "document" and isinstance(block.get("source"), dict) \
                and block["source"].get("type") == "text" and isinstance(block["source"].get("data"), str):
            block["source"]["data"] = fn(block["source"]["data"])


def map_messages_request(body: dict[str, Any], fn: Fn, parts_fn: PartsFn | None = None) -> dict[str, Any]:
    """A deep copy of a Messages request with `fn` applied to every position that can carry user
    data (images are not text: left as they are)."""
    out = copy.deepcopy(body)
    if isinstance(out.get("system"), str):
        out["system"] = fn(out["system"])
    elif isinstance(out.get("system"), list):
        _messages_blocks(out["system"], fn, parts_fn)
    for msg in out.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        if isinstance(msg.get("content"), str):
            msg["content"] = fn(msg["content"])
        elif isinstance(msg.get("content"), list):
            _messages_blocks(msg["content"], fn, parts_fn)
    _tools(out.get("tools"), fn, "input_schema")
    _metadata(out, fn)
    return out


def _restore_messages_block(block: Any, text: TextRestorer) -> Any:
    if not isinstance(block, dict):
        return block
    out = dict(block)
    for key in ("text", "thinking"):
        if isinstance(out.get(key), str):
            out[key] = text.restore(out[key])
    if out.get("type") == "tool_use" and "input" in out:
        out["input"] = map_json_strings(out["input"], text.restore)  # decoded values: plain text
    return out


def restore_messages_answer(message: dict[str, Any], text: TextRestorer) -> dict[str, Any]:
    out = dict(message)
    if isinstance(out.get("content"), list):
        out["content"] = [_restore_messages_block(b, text) for b in out["content"]]
    return out


class EventRestorer(ABC):
    """One API's stream events, restored as they come (see the module's docstring)."""

    def __init__(self, text: TextRestorer, args: TextRestorer) -> None:
        self.text = text
        self.args = args
        self.streams: dict[tuple[Any, ...], TextStream] = {}

    def _feed(self, key: tuple[Any, ...], value: str, json_escaped: bool) -> str:
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = TextStream(self.args if json_escaped else self.text)
        return stream.feed(value)

    def _held(self, match: Callable[[tuple[Any, ...]], bool]) -> list[tuple[tuple[Any, ...], str]]:
        """What the streams whose key matches still hold, released (and those streams ended)."""
        out = []
        for key in [k for k in self.streams if match(k)]:
            rest = self.streams.pop(key).flush()
            if rest:
                out.append((key, rest))
        return out

    @abstractmethod
    def feed(self, event: Event) -> list[Event]: ...

    @abstractmethod
    def flush(self) -> list[Event]:
        """What is still held, as delta events (the stream ends without its closing events)."""


_MESSAGES_DELTAS = {"text_delta": ("text", False), "thinking_delta": ("thinking", False),
                    "input_json_delta": ("partial_json", True)}
_MESSAGES_DELTA_TYPE = {field: kind for kind, (field, _) in _MESSAGES_DELTAS.items()}


class MessagesEventRestorer(EventRestorer):
    def _released(self, index: Any, field: str, text: str) -> Event:
        return {"type": "content_block_delta", "index": index,
                "delta": {"type": _MESSAGES_DELTA_TYPE[field], field: text}}

    def feed(self, event: Event) -> list[Event]:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            spec = _MESSAGES_DELTAS.get(str(delta.get("type"))) if isinstance(delta, dict) else None
            if spec is None or not isinstance(delta, dict) or not isinstance(delta.get(spec[0]), str):
                return [event]
            field, escaped = spec
            released = self._feed((event.get("index"), field), delta[field], escaped)
            return [{**event, "delta": {**delta, field: released}}] if released else []
        if kind == "content_block_stop":
            index = event.get("index")
            held = self._held(lambda k: k[0] == index)
            return [*(self._released(index, key[1], rest) for key, rest in held), event]
        if kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            return [{**event, "content_block": _restore_messages_block(event["content_block"], self.text)}]
        if kind == "message_start" and isinstance(event.get("message"), dict):
            return [{**event, "message": restore_messages_answer(event["message"], self.text)}]
        return [event]

    def flush(self) -> list[Event]:
        return [self._released(key[0], key[1], rest) for key, rest in self._held(lambda k: True)]


# -- OpenAI Responses ---------------------------------------------------------------------------

_RESPONSES_TEXT = {"input_text": "text", "output_text": "text", "refusal": "refusal", "summary_text": "text",
                   "reasoning_text": "text"}


def _text_or_parts(item: dict[str, Any], key: str, fn: Fn, parts_fn: PartsFn | None) -> None:
    """`item[key]`, a string or a list of text parts, in place."""
    if isinstance(item.get(key), str):
        item[key] = fn(item[key])
    elif isinstance(item.get(key), list):
        _parts(item[key], _RESPONSES_TEXT, fn, parts_fn)


def _responses_item(item: dict[str, Any], fn: Fn, parts_fn: PartsFn | None, args: Fn) -> None:
    kind = item.get("type", "message")
    if kind in ("message", "function_call_output"):
        _text_or_parts(item, "content" if kind == "message" else "output", fn, parts_fn)
    elif kind == "function_call":
        item["arguments"] = _json_text(item.get("arguments"), args)
    elif kind == "reasoning":
        for key in ("summary", "content"):
            if isinstance(item.get(key), list):
                _parts(item[key], _RESPONSES_TEXT, fn, None)


def map_responses_request(body: dict[str, Any], fn: Fn, parts_fn: PartsFn | None = None) -> dict[str, Any]:
    """A deep copy of a Responses request with `fn` applied to every position that can carry user
    data."""
    out = copy.deepcopy(body)
    if isinstance(out.get("instructions"), str):
        out["instructions"] = fn(out["instructions"])
    if isinstance(out.get("input"), str):
        out["input"] = fn(out["input"])
    elif isinstance(out.get("input"), list):
        for item in out["input"]:
            if isinstance(item, dict):
                _responses_item(item, fn, parts_fn, fn)
    _tools(out.get("tools"), fn, "parameters")
    _metadata(out, fn)
    if isinstance(out.get("user"), str):
        out["user"] = fn(out["user"])
    return out


def _restore_responses_item(item: Any, text: TextRestorer, args: TextRestorer) -> Any:
    if not isinstance(item, dict):
        return item
    out = copy.deepcopy(item)
    _responses_item(out, text.restore, None, text.restore)  # arguments: decoded, then re-encoded
    return out


def restore_responses_answer(response: dict[str, Any], text: TextRestorer, args: TextRestorer) -> dict[str, Any]:
    """A `response` object restored: its output items, and the request's echoed `instructions`
    and `metadata` (the upstream echoes what it was sent, placeholders included)."""
    out = dict(response)
    if isinstance(out.get("output"), list):
        out["output"] = [_restore_responses_item(i, text, args) for i in out["output"]]
    if isinstance(out.get("instructions"), str):
        out["instructions"] = text.restore(out["instructions"])
    _metadata(out, text.restore)
    return out


_RESPONSES_DELTAS = {"response.output_text.delta": ("content_index", False),
                     "response.refusal.delta": ("content_index", False),
                     "response.reasoning_summary_text.delta": ("summary_index", False),
                     "response.reasoning_text.delta": ("content_index", False),
                     "response.function_call_arguments.delta": (None, True)}
# a `.done` event -> its delta event type, the field holding the whole text, whether JSON text
_RESPONSES_DONE = {"response.output_text.done": ("response.output_text.delta", "text"),
                   "response.refusal.done": ("response.refusal.delta", "refusal"),
                   "response.reasoning_summary_text.done": ("response.reasoning_summary_text.delta", "text"),
                   "response.reasoning_text.done": ("response.reasoning_text.delta", "text"),
                   "response.function_call_arguments.done": ("response.function_call_arguments.delta", "arguments")}
_RESPONSES_OBJECT = ("response.created", "response.in_progress", "response.completed", "response.incomplete",
                     "response.failed", "response.queued")


class ResponsesEventRestorer(EventRestorer):
    def _key(self, kind: str, event: Event) -> tuple[Any, ...]:
        sub, _ = _RESPONSES_DELTAS[kind]
        return (event.get("output_index"), kind, event.get(sub) if sub else 0)

    def _delta(self, kind: str, like: Event, text: str) -> Event:
        out = {k: v for k, v in like.items() if k in ("item_id", "output_index", "content_index", "summary_index",
                                                    "sequence_number")}
        out.update({"type": kind, "delta": text})
        if kind == "response.output_text.delta":
            out["logprobs"] = []
        return out

    def feed(self, event: Event) -> list[Event]:
        kind = str(event.get("type") or "")
        if kind in _RESPONSES_DELTAS and isinstance(event.get("delta"), str):
            released = self._feed(self._key(kind, event), event["delta"], _RESPONSES_DELTAS[kind][1])
            return [{**event, "delta": released}] if released else []
        if kind in _RESPONSES_DONE:
            delta_kind, field = _RESPONSES_DONE[kind]
            key = self._key(delta_kind, event)
            held = self._held(lambda k: k == key)
            out = [self._delta(delta_kind, event, rest) for _, rest in held]
            if isinstance(event.get(field), str):
                restorer = self.args if _RESPONSES_DELTAS[delta_kind][1] else self.text
                event = {**event, field: restorer.restore(event[field])}
            return [*out, event]
        if kind in ("response.content_part.added", "response.content_part.done", "response.reasoning_summary_part.added",
                    "response.reasoning_summary_part.done") and isinstance(event.get("part"), dict):
            part = dict(event["part"])
            for name in ("text", "refusal"):
                if isinstance(part.get(name), str):
                    part[name] = self.text.restore(part[name])
            return [{**event, "part": part}]
        if kind in ("response.output_item.added", "response.output_item.done"):
            index = event.get("output_index")
            held = self._held(lambda k: k[0] == index) if kind.endswith(".done") else []
            out = [self._delta(key[1], event, rest) for key, rest in held]
            return [*out, {**event, "item": _restore_responses_item(event.get("item"), self.text, self.args)}]
        if kind in _RESPONSES_OBJECT and isinstance(event.get("response"), dict):
            return [{**event, "response": restore_responses_answer(event["response"], self.text, self.args)}]
        return [event]

    def flush(self) -> list[Event]:
        return [self._delta(key[1], {"output_index": key[0]}, rest) for key, rest in self._held(lambda k: True)]


# -- per API --------------------------------------------------------------------------------------


class NativeCodec(ABC):
    """Redaction and restoration for one API's own bodies."""

    @abstractmethod
    def redact(self, body: dict[str, Any], vault: Vault) -> dict[str, Any]: ...

    @abstractmethod
    def restore(self, answer: dict[str, Any], vault: Vault) -> dict[str, Any]: ...

    @abstractmethod
    def event_restorer(self, vault: Vault) -> EventRestorer: ...


class MessagesCodec(NativeCodec):
    def redact(self, body: dict[str, Any], vault: Vault) -> dict[str, Any]:
        return map_messages_request(body, vault.redact_text, vault.redact_parts)

    def restore(self, answer: dict[str, Any], vault: Vault) -> dict[str, Any]:
        return restore_messages_answer(answer, vault.restorers()[0])

    def event_restorer(self, vault: Vault) -> EventRestorer:
        return MessagesEventRestorer(*vault.restorers())


class ResponsesCodec(NativeCodec):
    def redact(self, body: dict[str, Any], vault: Vault) -> dict[str, Any]:
        return map_responses_request(body, vault.redact_text, vault.redact_parts)

    def restore(self, answer: dict[str, Any], vault: Vault) -> dict[str, Any]:
        return restore_responses_answer(answer, *vault.restorers())

    def event_restorer(self, vault: Vault) -> EventRestorer:
        return ResponsesEventRestorer(*vault.restorers())


CODECS: dict[NativeAPI, NativeCodec] = {"messages": MessagesCodec(), "responses": ResponsesCodec()}


class PassthroughStreamRestorer:
    """A pass-through stream's chunks restored: the chat side (what the pipeline reads to resume
    and count) by the vault's StreamRestorer, the upstream events the chunk carries by the API's
    EventRestorer. Both see the same texts in the same pieces, so they release the same text."""

    def __init__(self, chat: StreamRestorer, events: EventRestorer) -> None:
        self.chat = chat
        self.events = events

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        native = chunk.get(NATIVE)
        if not isinstance(native, list):
            return self.chat.feed(chunk)
        out = self.chat.feed({k: v for k, v in chunk.items() if k != NATIVE})
        restored = [e for event in native for e in self.events.feed(event)]
        return carry(out, chunk, restored)

    def flush(self) -> list[dict[str, Any]]:
        return carry(self.chat.flush(), None, self.events.flush())

