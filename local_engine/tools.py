"""Function calling on the local engine: tool definitions into the prompt, a grammar for the
calls, calls back out of the text (whole or streamed).

The model writes calls the Hermes / Qwen way, one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The grammar (``calls_grammar``) fixes everything but the function's name (one of the declared
ones) and its arguments (that function's JSON Schema), so ``parse`` never meets a malformed call.

Prompt: a chat template that renders ``tools`` itself (Qwen2.5, Qwen3, Hermes, Llama 3.1...) gets
them and the history as Hugging Face passes them. One without (SmolLM2, plain ChatML) gets the
fallback: a system-prompt section listing the functions in the same Hermes format, earlier calls
written as ``<tool_call>`` blocks in the assistant turn, and tool results as a user turn of
``<tool_response>`` blocks (the convention Qwen's template uses).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from local_engine.errors import EngineError
from local_engine.grammar import Grammar, check_schema, json_schema_lark

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
MAX_PARALLEL = 8  # calls in one answer with parallel_tool_calls: a bound keeps a loop finite

FALLBACK_PROMPT = (
    "You may call these functions (JSON Schema):\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with <tool_call>\n{{\"name\": <name>, \"arguments\": <object>}}\n</tool_call>. "
    "Results come back in <tool_response></tool_response>."
)


class ToolError(EngineError):
    """A malformed tools / tool_choice request (400)."""


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_tool(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolSpec:
    functions: tuple[Function, ...]
    choice: str  # "none" | "auto" | "required" | "function" (then ``name``)
    name: str | None = None
    parallel: bool = True

    @property
    def calls_allowed(self) -> bool:
        return self.choice != "none" and bool(self.functions)


def parse_spec(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> ToolSpec | None:
    """OpenAI ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` -> ToolSpec (None: no tools)."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice is set but there are no tools")
        return None
    if not isinstance(tools, list):
        raise ToolError("tools must be a list")
    fns: list[Function] = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON Schema object")
        fns.append(Function(f["name"], str(f.get("description") or ""), params))
    if len({f.name for f in fns}) != len(fns):
        raise ToolError("tools: function names must be unique")
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice is None:
        return ToolSpec(tuple(fns), "auto" if fns else "none", parallel=parallel)
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not fns:
            raise ToolError("tool_choice is 'required' but there are no tools")
        return ToolSpec(tuple(fns), str(tool_choice), parallel=parallel)
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in {f.name for f in fns}:
            raise ToolError(f"tool_choice names function {name!r}, which is not in tools")
        return ToolSpec(tuple(fns), "function", name=str(name), parallel=parallel)
    raise ToolError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                    "\"function\": {\"name\": ...}}")


def _lark_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid lark string literal


def calls_grammar(spec: ToolSpec, text_schema: dict[str, Any] | None = None) -> Grammar:
    """The answer's grammar: calls only (required / a named function), or text or calls (auto);
    with ``text_schema`` (response_format and tools together) the text must be that JSON."""
    fns = [f for f in spec.functions if spec.choice != "function" or f.name == spec.name]
    rules = []
    alts = []
    for i, f in enumerate(fns):
        check_schema(f.parameters, f"tools[{spec.functions.index(f)}].function.parameters")
        prefix = OPEN + '{"name": ' + json.dumps(f.name) + ', "arguments": '
        rules.append(f"call_{i}: {_lark_str(prefix)} args_{i} {_lark_str('}' + CLOSE)}")
        rules.append(f"args_{i}: {json_schema_lark(f.parameters)}")
        alts.append(f"call_{i}")
    # at most one call per function offered: unbounded, the built-in model repeated its last call
    # until max_tokens (a cut call is lost); a second call of one function takes another turn
    n = min(len(fns), MAX_PARALLEL) if spec.parallel else 1
    more = f' ("\\n" call){{0,{n - 1}}}' if n > 1 else ""
    if spec.choice != "auto":
        head = ["start: calls"]
    elif text_schema is not None:
        head = ["start: text | calls", f"text: {json_schema_lark(text_schema)}"]
    else:
        head = ["start: TEXT | calls", r"TEXT: /(?s:.+)/ & ~/(?s:<tool_call>.*)/"]
    src = "\n".join([*head, f"calls: call{more}", "call: " + " | ".join(alts), *rules]) + "\n"
    free_text = spec.choice == "auto" and text_schema is None
    g = Grammar.lark(src, free_text_unless=OPEN.strip() if free_text else None)
    g.check()
    return g


def shows_calls(messages: list[dict[str, Any]]) -> bool:
    """Whether the prompt shows calls (calls and results in the history): where the answer may not
    call, the model has seen ``<tool_call>`` blocks and, measured on the built-in model after a
    two-call history, writes one as its "answer"."""
    return any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)


@functools.cache
def text_grammar() -> Grammar:
    """Free text (stop strings apply) that does not open with markup or blank space and holds no
    ``<tool``: the answer where calls are not allowed but the prompt shows them (``shows_calls``).
    Measured on the built-in model after a two-call history: barred only from ``<tool_call>``, it
    wrote ``<tool_call_response>`` blocks, then ``<item_name>`` ones; barred from opening with
    markup, prose."""
    g = Grammar(Grammar.lark("start: TEXT\nTEXT: /(?s:[^<\\s].*)/ & ~/(?s:.*<tool.*)/\n").source,
                stop_strings=True)
    g.check()
    return g


# ---------------------------------------------------------------------------------- prompt
def template_renders_tools(source: str | None) -> bool:
    """Whether the chat template has its own tool convention (it reads the ``tools`` variable)."""
    if not source:
        return False
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateSyntaxError:
        return False


def _hf_call(c: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as HF templates expect it (arguments as an object, not a string)."""
    f = c.get("function") or {}
    args = f.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # render what was sent
    return {"id": c.get("id"), "type": "function", "function": {"name": f.get("name"), "arguments": args}}


def call_text(name: str, arguments: Any) -> str:
    return OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CLOSE


def prompt_messages(messages: list[dict[str, Any]], spec: ToolSpec | None,
                    template_has_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to hand the chat template: tool definitions where calls are allowed, and
    earlier calls / results in the template's convention or the fallback's."""
    tools = [f.as_tool() for f in spec.functions] if spec is not None and spec.calls_allowed else None
    if template_has_tools:
        out = []
        for m in messages:
            if m.get("role") == "assistant" and m.get("tool_calls"):
                m = {**m, "tool_calls": [_hf_call(c) for c in m["tool_calls"]]}
            out.append(m)
        return out, tools
    out = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            text = _plain(m.get("content"))
            calls = "\n".join(call_text(c["function"]["name"], _hf_call(c)["function"]["arguments"])
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        elif role == "tool":
            block = "<tool_response>\n" + _plain(m.get("content")) + "\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "role": "system", "content": _plain(out[0].get("content")) + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out, None


def _plain(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


# ---------------------------------------------------------------------------------- output
@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text, as OpenAI returns it


def parse(text: str) -> tuple[str | None, list[Call]]:
    """(content, calls) of an answer written under ``calls_grammar``, read as ``CallStream`` reads
    it streamed: a call cut by max_tokens comes back with the arguments written so far (as OpenAI's
    with finish_reason "length"), never as markup in the content."""
    if not text.startswith(OPEN):
        return text, []
    cs = CallStream()
    names: list[str] = []
    args: list[str] = []
    for ev in (*cs.feed(text), *cs.close()):
        if ev[0] == "call":
            names.append(ev[2])
            args.append("")
        elif ev[0] == "args":
            args[ev[1]] += ev[2]
    return None, [Call(n, a) for n, a in zip(names, args, strict=True)]


class CallStream:
    """Turns streamed text into content deltas or tool-call events, as the text arrives.

    ``feed(delta)`` / ``close()`` yield ``("content", text)``, ``("call", index, name)`` and
    ``("args", index, json_text_delta)``. Text is held back only while it could still be the start
    of a call marker or the end of a call (``}`` + the closing tag)."""

    _HEAD = re.compile(re.escape(OPEN) + r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')

    def __init__(self) -> None:
        self.buf = ""
        self.mode: str | None = None  # None (undecided) | "content" | "calls"
        self.index = -1
        self.in_args = False

    def feed(self, delta: str) -> Iterator[tuple[Any, ...]]:
        self.buf += delta
        if self.mode is None:
            if self.buf.startswith(OPEN):
                self.mode = "calls"
            elif not OPEN.startswith(self.buf):
                self.mode = "content"
            else:
                return
        if self.mode == "content":
            out, self.buf = self.buf, ""
            if out:
                yield ("content", out)
            return
        yield from self._calls(final=False)

    def close(self) -> Iterator[tuple[Any, ...]]:
        if self.mode is None and self.buf:
            yield ("content", self.buf)
        elif self.mode == "calls":
            yield from self._calls(final=True)
        self.buf = ""

    def _calls(self, final: bool) -> Iterator[tuple[Any, ...]]:
        tail = "}" + CLOSE
        while True:
            if not self.in_args:
                self.buf = self.buf.lstrip("\n") if self.index >= 0 else self.buf
                m = self._HEAD.match(self.buf)
                if m is None:
                    return
                self.index += 1
                self.in_args = True
                self.buf = self.buf[m.end():]
                yield ("call", self.index, json.loads(m.group(1)))
            end = self.buf.find(tail)
            if end >= 0:
                if end:
                    yield ("args", self.index, self.buf[:end])
                self.buf = self.buf[end + len(tail):]
                self.in_args = False
                continue
            keep = 0 if final else len(tail) - 1
            emit = self.buf[:max(0, len(self.buf) - keep)]
            if emit:
                yield ("args", self.index, emit)
                self.buf = self.buf[len(emit):]
            return
