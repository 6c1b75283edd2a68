"""Where text lives in an OpenAI chat request, named by JSON-pointer-like paths.

Everything that would leave the device is visited: message content (strings and text parts),
`name` fields, assistant `tool_calls[].function.arguments` (and legacy `function_call`),
`role: tool` results, refusals, tool definitions' descriptions (parameters' descriptions too),
and the top-level `user` and `metadata` values.

A message whose content is a list of text parts is also read across each boundary between two
parts: a *seam* segment (`/messages/4/content/0+1`) holds the last few words of one part and the
first few of the next, joined as the model reads them, so a token split across two parts is still
found whole. Redaction then replaces a value wherever it runs across parts (map_text's `parts_fn`).

Tool-call arguments are JSON text. When they parse, each string value is its own segment, at
`.../function/arguments/<pointer inside the arguments>`, so redaction can re-serialise valid JSON;
when they don't, the raw text is one segment.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_TEXT_PART_KEYS = {"text": "text", "refusal": "refusal"}


@dataclass(frozen=True)
class Segment:
    location: str
    text: str


@dataclass(frozen=True)
class Seam:
    """Where two neighbouring text parts of one message meet."""

    location: str  # "/messages/4/content/0+1"
    left: str  # the two parts' own segment locations
    right: str
    offset: int  # where the seam's text starts in the left part
    split: int  # where the right part's text starts in the seam's text
    text: str


# A seam holds this many words either side: enough for a card number in groups or a label
# ("password:") before a value, bounded for one huge word (a base64 blob).
_SEAM_WORDS = 6
_SEAM_MAX_CHARS = 4096


def _tail_start(text: str) -> int:
    i, lo = len(text), max(0, len(text) - _SEAM_MAX_CHARS)
    for _ in range(_SEAM_WORDS):
        while i > lo and text[i - 1].isspace():
            i -= 1
        while i > lo and not text[i - 1].isspace():
            i -= 1
    return i


def _head_end(text: str) -> int:
    i, hi = 0, min(len(text), _SEAM_MAX_CHARS)
    for _ in range(_SEAM_WORDS):
        while i < hi and text[i].isspace():
            i += 1
        while i < hi and not text[i].isspace():
            i += 1
    return i


def _text_parts(content: list[Any]) -> list[tuple[int, str | None, str]]:
    """(index, key or None for a bare string, text) of a content list's text parts, in order."""
    out: list[tuple[int, str | None, str]] = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            out.append((j, None, part))
        elif isinstance(part, dict):
            key = _TEXT_PART_KEYS.get(part.get("type", ""))
            if key is not None and isinstance(part.get(key), str):
                out.append((j, key, part[key]))
    return out


def _part_location(base: str, j: int, key: str | None) -> str:
    return f"{base}/content/{j}" if key is None else f"{base}/content/{j}/{key}"


def seams(body: dict[str, Any]) -> list[Seam]:
    """The boundaries between neighbouring non-empty text parts of every message."""
    out: list[Seam] = []
    for i, msg in enumerate(body.get("messages") or []):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        base = f"/messages/{i}"
        parts = [p for p in _text_parts(content) if p[2]]
        for (j, jkey, a), (k, kkey, b) in itertools.pairwise(parts):
            start = _tail_start(a)
            tail, head = a[start:], b[: _head_end(b)]
            out.append(Seam(f"{base}/content/{j}+{k}", _part_location(base, j, jkey), _part_location(base, k, kkey),
                            start, len(tail), tail + head))
    return out


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _json_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _json_strings(v, f"{path}/{_esc(str(k))}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_strings(v, f"{path}/{i}")


def map_json_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_json_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_json_strings(v, fn) for v in value]
    return value


def _parse_arguments(raw: str) -> Any | None:
    try:
        parsed = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return parsed if isinstance(parsed, dict | list) else None


def _schema_descriptions(schema: Any, path: str) -> Iterator[tuple[str, str]]:
    """`description` strings anywhere inside a JSON schema (parameters of a tool)."""
    if isinstance(schema, dict):
        for k, v in schema.items():
            sub = f"{path}/{_esc(str(k))}"
            if k == "description" and isinstance(v, str):
                yield sub, v
            else:
                yield from _schema_descriptions(v, sub)
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            yield from _schema_descriptions(v, f"{path}/{i}")


def _args_segments(raw: Any, path: str) -> Iterator[tuple[str, str]]:
    if not isinstance(raw, str):
        return
    parsed = _parse_arguments(raw)
    if parsed is None:
        yield path, raw
    else:
        yield from _json_strings(parsed, path)


def walk(body: dict[str, Any]) -> tuple[list[Segment], list[str]]:
    """(text segments, locations of parts that cannot be scanned: images, audio, files)."""
    segments: list[Segment] = []
    unscanned: list[str] = []

    def add(location: str, text: Any) -> None:
        if isinstance(text, str) and text:
            segments.append(Segment(location, text))

    for i, msg in enumerate(body.get("messages") or []):
        if not isinstance(msg, dict):
            continue
        base = f"/messages/{i}"
        add(f"{base}/name", msg.get("name"))
        add(f"{base}/refusal", msg.get("refusal"))
        content = msg.get("content")
        if isinstance(content, str):
            add(f"{base}/content", content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, str):
                    add(f"{base}/content/{j}", part)
                    continue
                if not isinstance(part, dict):
                    continue
                key = _TEXT_PART_KEYS.get(part.get("type", ""))
                if key is not None:
                    add(f"{base}/content/{j}/{key}", part.get(key))
                else:
                    unscanned.append(f"{base}/content/{j}")
        for k, call in enumerate(msg.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                yield_path = f"{base}/tool_calls/{k}/function/arguments"
                for loc, text in _args_segments(fn.get("arguments"), yield_path):
                    add(loc, text)
        legacy = msg.get("function_call")
        if isinstance(legacy, dict):
            for loc, text in _args_segments(legacy.get("arguments"), f"{base}/function_call/arguments"):
                add(loc, text)

    for t, tool in enumerate(body.get("tools") or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict):
            add(f"/tools/{t}/function/description", fn.get("description"))
            for loc, text in _schema_descriptions(fn.get("parameters"), f"/tools/{t}/function/parameters"):
                add(loc, text)
    for t, fn in enumerate(body.get("functions") or []):
        if isinstance(fn, dict):
            add(f"/functions/{t}/description", fn.get("description"))
            for loc, text in _schema_descriptions(fn.get("parameters"), f"/functions/{t}/parameters"):
                add(loc, text)

    add("/user", body.get("user"))
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        for k, v in metadata.items():
            add(f"/metadata/{_esc(str(k))}", v)
    for seam in seams(body):
        add(seam.location, seam.text)
    return segments, unscanned


def map_text(
    body: dict[str, Any],
    fn: Callable[[str], str],
    name_fn: Callable[[str], str] | None = None,
    parts_fn: Callable[[list[str]], list[str]] | None = None,
) -> dict[str, Any]:
    """A deep copy of `body` with `fn` applied to every text that `walk` visits.

    Message `name` fields go through `name_fn` instead when given: they must stay identifiers
    (OpenAI accepts only [A-Za-z0-9_-] there). A message's text parts go through `parts_fn`
    together when given (a value may run across two of them), else through `fn` one by one.

    Tool-call arguments that are JSON are re-serialised after mapping their string values, so
    they stay valid JSON whatever the replacements contain.
    """
    out = copy.deepcopy(body)

    def args(raw: Any) -> Any:
        if not isinstance(raw, str):
            return raw
        parsed = _parse_arguments(raw)
        if parsed is None:
            return fn(raw)
        return json.dumps(map_json_strings(parsed, fn), ensure_ascii=False)

    def schema(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (fn(v) if k == "description" and isinstance(v, str) else schema(v)) for k, v in value.items()
            }
        if isinstance(value, list):
            return [schema(v) for v in value]
        return value

    for msg in out.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        if isinstance(msg.get("name"), str):
            msg["name"] = (name_fn or fn)(msg["name"])
        if isinstance(msg.get("refusal"), str):
            msg["refusal"] = fn(msg["refusal"])
        content = msg.get("content")
        if isinstance(content, str):
            msg["content"] = fn(content)
        elif isinstance(content, list):
            parts = _text_parts(content)
            texts = [t for _, _, t in parts]
            new = parts_fn(texts) if parts_fn is not None and len(texts) > 1 else [fn(t) for t in texts]
            for (j, key, _), text in zip(parts, new, strict=True):
                if key is None:
                    content[j] = text
                else:
                    content[j][key] = text
        for call in msg.get("tool_calls") or []:
            f = call.get("function") if isinstance(call, dict) else None
            if isinstance(f, dict) and "arguments" in f:
                f["arguments"] = args(f["arguments"])
        legacy = msg.get("function_call")
        if isinstance(legacy, dict) and "arguments" in legacy:
            legacy["arguments"] = args(legacy["arguments"])

    for tool in out.get("tools") or []:
        f = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(f, dict):
            if isinstance(f.get("description"), str):
                f["description"] = fn(f["description"])
            if "parameters" in f:
                f["parameters"] = schema(f["parameters"])
    for f in out.get("functions") or []:
        if isinstance(f, dict):
            if isinstance(f.get("description"), str):
                f["description"] = fn(f["description"])
            if "parameters" in f:
                f["parameters"] = schema(f["parameters"])

    if isinstance(out.get("user"), str):
        out["user"] = fn(out["user"])
    if isinstance(out.get("metadata"), dict):
        out["metadata"] = {k: fn(v) if isinstance(v, str) else v for k, v in out["metadata"].items()}
    return out
