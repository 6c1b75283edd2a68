"""Putting original values back into model output, whole or streamed.

A `TextRestorer` knows how to replace what the vault handed out (placeholders or surrogates) in a
piece of text, and how much of a text's tail must wait because it could still become one. The
streaming code keeps, per text stream, only that tail (bounded by the longest replacement) plus
one character of left context, which makes streamed output identical to restoring the whole text
at once, for any chunking (a hypothesis test checks this).

Placeholders are matched tolerantly, as models mangle them: `<PERSON_1>`, `PERSON_1`, `<Person_1>`,
`<PERSON_1>'s`, `[PERSON_1]`. A placeholder-looking word the vault never issued is left alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
# An optional "<", a whole ASCII word TYPE_N, an optional ">". The look-arounds make the word
# whole: no match starts or ends inside a longer word.
_PLACEHOLDER = re.compile(r"<?(?<![A-Za-z0-9_])([A-Za-z][A-Za-z0-9_]*?_[0-9]+)(?![A-Za-z0-9_])>?")


def _json_escape(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


class TextRestorer:
    """Restores one kind of text (plain, or the inside of JSON strings: `json_escape`)."""

    def __init__(
        self,
        *,
        placeholders: dict[str, str] | None = None,
        surrogates: dict[str, str] | None = None,
        json_escape: bool = False,
    ) -> None:
        # placeholders: upper-cased key (PERSON_1) -> original; surrogates: surrogate -> original.
        self._keys = placeholders or {}
        self._surrogates = surrogates or {}
        self._escape: Callable[[str], str] = _json_escape if json_escape else (lambda s: s)
        self._key_prefixes = {k[:i] for k in self._keys for i in range(len(k) + 1)}
        self._sur_prefixes = {s[:i] for s in self._surrogates for i in range(1, len(s) + 1)}
        self.max_hold = max([len(k) + 1 for k in self._keys] + [len(s) for s in self._surrogates] + [0])
        self._sur_re = (
            re.compile("|".join(re.escape(s) for s in sorted(self._surrogates, key=len, reverse=True)))
            if self._surrogates
            else None
        )

    def restore(self, text: str, context: str = "") -> str:
        """Replace in `text`; `context` is the character that preceded it (for word boundaries)."""
        if self._keys:
            text = self._restore_placeholders(text, context)
        if self._sur_re is not None:
            text = self._sur_re.sub(lambda m: self._escape(self._surrogates[m.group(0)]), text)
        return text

    def _restore_placeholders(self, text: str, context: str) -> str:
        s = context + text
        out: list[str] = []
        last = len(context)
        for m in _PLACEHOLDER.finditer(s, len(context)):
            original = self._keys.get(m.group(1).upper())
            if original is None:
                continue
            out.append(s[last : m.start()])
            out.append(self._escape(original))
            last = m.end()
        out.append(s[last:])
        return "".join(out)

    def safe_cut(self, text: str) -> int:
        """How much of `text` can be released now: the rest could still become a replacement."""
        cut = len(text)
        if self._keys:
            i = len(text)
            while i > 0 and text[i - 1] in _WORD and len(text) - i <= self.max_hold:
                i -= 1
            run = text[i:]
            if len(run) <= self.max_hold and run.upper() in self._key_prefixes:
                cut = i - 1 if i > 0 and text[i - 1] == "<" else i
        if self._surrogates:
            for start in range(max(0, len(text) - self.max_hold), len(text)):
                if text[start:] in self._sur_prefixes:
                    cut = min(cut, start)
                    break
        return cut


class TextStream:
    """One growing text (a choice's content, or one tool call's arguments) being restored."""

    def __init__(self, restorer: TextRestorer) -> None:
        self._r = restorer
        self._held = ""
        self._context = ""  # last released raw character: left context for word boundaries

    def feed(self, text: str) -> str:
        buf = self._held + text
        cut = self._r.safe_cut(buf)
        return self._release(buf, cut)

    def flush(self) -> str:
        buf, self._held = self._held, ""
        return self._release(buf, len(buf))

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def _release(self, buf: str, cut: int) -> str:
        ready, self._held = buf[:cut], buf[cut:]
        if not ready:
            return ""
        out = self._r.restore(ready, self._context)
        self._context = ready[-1]
        return out


def _copy_chunk_skeleton(chunk: dict[str, Any], choices: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
    out["choices"] = choices
    return out


class StreamRestorer:
    """Restores OpenAI `chat.completion.chunk` dicts: per choice, content and tool-call arguments.

    `feed(chunk)` returns the chunks to forward now (possibly none: a chunk whose only text is
    being held is dropped). A chunk carrying `finish_reason` first releases everything its choice
    still holds, in order. `flush()` releases what is left at the end of the stream.
    """

    def __init__(self, text: TextRestorer, args: TextRestorer) -> None:
        self._text_r = text
        self._args_r = args
        self._streams: dict[tuple[int, str, int], TextStream] = {}
        self._template: dict[str, Any] | None = None

    def _stream(self, key: tuple[int, str, int]) -> TextStream:
        s = self._streams.get(key)
        if s is None:
            s = TextStream(self._args_r if key[1] == "args" else self._text_r)
            self._streams[key] = s
        return s

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return [chunk]
        self._template = chunk
        before: list[dict[str, Any]] = []
        new_choices: list[dict[str, Any]] = []
        for choice in choices:
            if not isinstance(choice, dict):
                new_choices.append(choice)
                continue
            idx = choice.get("index", 0)
            finishing = choice.get("finish_reason") is not None
            delta = choice.get("delta")
            touched: set[tuple[int, str, int]] = set()
            new_delta = self._restore_delta(idx, delta, finishing, touched) if isinstance(delta, dict) else delta
            if finishing:
                rest = self._release_choice(idx, exclude=touched)
                if rest is not None:
                    before.append(_copy_chunk_skeleton(chunk, [rest]))
            new_choice = dict(choice)
            new_choice["delta"] = new_delta
            if finishing or not _empty_delta(new_delta) or choice.keys() - {"index", "delta", "finish_reason", "logprobs"}:
                new_choices.append(new_choice)
        out = before
        if new_choices or chunk.get("usage") is not None:
            out.append(_copy_chunk_skeleton(chunk, new_choices) | ({"usage": chunk["usage"]} if "usage" in chunk else {}))
        return out

    def flush(self) -> list[dict[str, Any]]:
        if self._template is None:
            return []
        out = []
        for idx in sorted({k[0] for k in self._streams}):
            rest = self._release_choice(idx, exclude=set())
            if rest is not None:
                out.append(_copy_chunk_skeleton(self._template, [rest]))
        return out

    def _restore_delta(
        self, idx: int, delta: dict[str, Any], finishing: bool, touched: set[tuple[int, str, int]]
    ) -> dict[str, Any]:
        out = dict(delta)
        for field in ("content", "reasoning_content"):
            if isinstance(delta.get(field), str):
                key = (idx, field, 0)
                s = self._stream(key)
                out[field] = s.feed(delta[field]) + (s.flush() if finishing else "")
                touched.add(key)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            new_calls = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
                    new_calls.append(call)
                    continue
                key = (idx, "args", call.get("index", 0))
                s = self._stream(key)
                args = s.feed(fn["arguments"]) + (s.flush() if finishing else "")
                touched.add(key)
                new_fn = dict(fn, arguments=args)
                new_call = dict(call, function=new_fn)
                if args or set(call) - {"index", "function", "type"} or set(fn) - {"arguments"}:
                    new_calls.append(new_call)
            if new_calls:
                out["tool_calls"] = new_calls
            else:
                out.pop("tool_calls")
        return out

    def _release_choice(self, idx: int, exclude: set[tuple[int, str, int]]) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        calls = []
        for key, s in sorted(self._streams.items()):
            if key[0] != idx or key in exclude or not s.holding:
                continue
            text = s.flush()
            if key[1] == "args":
                calls.append({"index": key[2], "function": {"arguments": text}})
            else:
                delta[key[1]] = text
        if calls:
            delta["tool_calls"] = calls
        if not delta:
            return None
        return {"index": idx, "delta": delta, "finish_reason": None}


def _empty_delta(delta: Any) -> bool:
    if not isinstance(delta, dict):
        return False
    return all(k in ("content", "reasoning_content") and v == "" for k, v in delta.items())
