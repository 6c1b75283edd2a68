"""One chat-shaped request sent through any of the gateway's three chat doors with the official SDKs
(chat completions and Responses with `openai`, Messages with `anthropic`), whole or streamed, and
the answer brought back to one shape, so a table of requests can be checked the same way on each.

A stream is assembled from its deltas here (text deltas, tool-call argument deltas, `input_json`
deltas, `function_call_arguments` deltas), not from the SDK's own accumulation: the deltas are
what a streaming agent reads. Where the SDK also assembles (Messages' final message, Responses'
terminal event) the two must agree.

Messages has no `response_format`: a request with one is expressed the Anthropic way, as a tool
whose `input_schema` is the schema and a `tool_choice` naming it (`Expressed.translated`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anthropic
import openai

APIS = ("chat", "messages", "responses")
MAX_TOKENS = 160
_EMPTY = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Answer:
    content: str | None
    calls: tuple[tuple[str, str], ...]  # (function name, arguments as JSON text)
    finish: str  # chat's words: stop | length | tool_calls
    headers: dict[str, str]

    def same_as(self, other: Answer) -> bool:
        """The same answer, whatever API carried it (arguments compared as JSON values)."""
        def norm(a: Answer) -> tuple[Any, ...]:
            return a.content, [(n, json.loads(args)) for n, args in a.calls], a.finish
        return norm(self) == norm(other)


@dataclass(frozen=True)
class Expressed:
    kwargs: dict[str, Any]
    request: dict[str, Any]  # the chat request the answer must satisfy
    translated: bool = False  # the request had to change shape to be said in this API


def _schema_tool(fmt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if fmt["type"] == "json_object":
        return "json_object", {"type": "object"}
    return fmt["json_schema"]["name"], fmt["json_schema"]["schema"]


def can_express(api: str, req: dict[str, Any]) -> bool:
    # Messages says "JSON" with a forced tool, which cannot sit beside the request's own tools
    return not (api == "messages" and req.get("response_format") and req.get("tools"))


def chat_kwargs(req: dict[str, Any]) -> Expressed:
    return Expressed({"model": "auto", "max_tokens": MAX_TOKENS, **req}, req)


def messages_kwargs(req: dict[str, Any]) -> Expressed:
    translated = "response_format" in req
    if translated:
        req = dict(req)
        name, schema = _schema_tool(req.pop("response_format"))
        req["tools"] = [{"type": "function", "function": {"name": name, "description": "Answer with this JSON",
                                                          "parameters": schema}}]
        req["tool_choice"] = {"type": "function", "function": {"name": name}}
    system = [m["content"] for m in req["messages"] if m["role"] == "system"]
    msgs: list[dict[str, Any]] = []
    for m in req["messages"]:
        last = msgs[-1] if msgs else None
        if m["role"] == "system":
            continue
        if m["role"] == "tool":  # results go back in a user turn, one tool_result block each
            block = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}
            if last is not None and last["role"] == "user" and isinstance(last["content"], list):
                last["content"].append(block)
            else:
                msgs.append({"role": "user", "content": [block]})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [{"type": "text", "text": m["content"]}] if m.get("content") else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": json.loads(c["function"]["arguments"])} for c in m["tool_calls"]]
            msgs.append({"role": "assistant", "content": blocks})
        elif m["role"] == "user" and last is not None and last["role"] == "user" and isinstance(last["content"], list):
            last["content"].append({"type": "text", "text": m["content"]})  # same turn as the results
        else:
            msgs.append({"role": m["role"], "content": m["content"]})
    kw: dict[str, Any] = {"model": req.get("model", "auto"), "max_tokens": req.get("max_tokens", MAX_TOKENS),
                          "messages": msgs}
    if system:
        kw["system"] = "\n".join(system)
    kw.update({k: req[k] for k in ("temperature", "top_p") if k in req})
    if req.get("tools"):
        kw["tools"] = [{"name": t["function"]["name"], "description": t["function"]["description"],
                        "input_schema": t["function"].get("parameters") or _EMPTY} for t in req["tools"]]
        choice = req.get("tool_choice", "auto")
        tc = ({"type": "tool", "name": choice["function"]["name"]} if isinstance(choice, dict)
              else {"type": {"required": "any"}.get(choice, choice)})
        if req.get("parallel_tool_calls") is False:
            tc["disable_parallel_tool_use"] = True
        kw["tool_choice"] = tc
    return Expressed(kw, req, translated)


def responses_kwargs(req: dict[str, Any]) -> Expressed:
    items: list[dict[str, Any]] = []
    instructions = None
    for i, m in enumerate(req["messages"]):
        if m["role"] == "system" and i == 0:
            instructions = m["content"]
        elif m["role"] == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            if m.get("content"):
                items.append({"role": "assistant", "content": m["content"]})
            items += [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                       "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
        else:
            items.append({"role": m["role"], "content": m["content"]})
    kw: dict[str, Any] = {"model": req.get("model", "auto"), "input": items,
                          "max_output_tokens": req.get("max_tokens", MAX_TOKENS)}
    if instructions is not None:
        kw["instructions"] = instructions
    kw.update({k: req[k] for k in ("temperature", "top_p", "parallel_tool_calls") if k in req})
    if req.get("tools"):
        kw["tools"] = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                        **({"parameters": t["function"]["parameters"]} if "parameters" in t["function"] else {})}
                       for t in req["tools"]]
        choice = req.get("tool_choice")
        if choice is not None:
            kw["tool_choice"] = {"type": "function", "name": choice["function"]["name"]} if isinstance(choice, dict) else choice
    fmt = req.get("response_format")
    if fmt is not None:
        kw["text"] = {"format": {"type": "json_object"} if fmt["type"] == "json_object" else
                      {"type": "json_schema", **{k: fmt["json_schema"][k] for k in ("name", "schema", "strict")}}}
    return Expressed(kw, req)


EXPRESS = {"chat": chat_kwargs, "messages": messages_kwargs, "responses": responses_kwargs}


class ThreeAPIs:
    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        self.openai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120,
                                    default_headers=headers)
        self.anthropic = anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0, timeout=120,
                                             default_headers=headers)

    def send(self, api: str, req: dict[str, Any], *, stream: bool) -> tuple[Expressed, Answer]:
        ex = EXPRESS[api](req)
        run = getattr(self, f"_{api}_{'stream' if stream else 'whole'}")
        return ex, run(ex.kwargs)

    # -- chat completions
    def _chat_whole(self, kw: dict[str, Any]) -> Answer:
        raw = self.openai.chat.completions.with_raw_response.create(**kw)
        r = raw.parse()
        msg = r.choices[0].message
        assert all(c.id.startswith("call_") for c in msg.tool_calls or [])
        calls = tuple((c.function.name, c.function.arguments) for c in msg.tool_calls or [])
        return Answer(msg.content or None, calls, r.choices[0].finish_reason, dict(raw.headers))

    def _chat_stream(self, kw: dict[str, Any]) -> Answer:
        content, slots, finish = "", {}, ""
        with self.openai.chat.completions.with_streaming_response.create(**kw, stream=True) as raw:
            for chunk in raw.parse():
                if not chunk.choices:
                    continue
                d = chunk.choices[0].delta
                content += d.content or ""
                for tc in d.tool_calls or []:
                    slot = slots.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
                    slot["id"] = slot["id"] or tc.id
                    slot["name"] += (tc.function.name or "") if tc.function else ""
                    slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
                finish = chunk.choices[0].finish_reason or finish
        assert all(s["id"] for s in slots.values())
        calls = tuple((s["name"], s["arguments"]) for _, s in sorted(slots.items()))
        return Answer(content or None, calls, finish, dict(raw.headers))

    # -- Anthropic Messages
    _STOP = {"tool_use": "tool_calls", "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}

    def _messages_whole(self, kw: dict[str, Any]) -> Answer:
        raw = self.anthropic.messages.with_raw_response.create(**kw)
        msg = raw.parse()
        text = "".join(b.text for b in msg.content if b.type == "text")
        calls = tuple((b.name, json.dumps(b.input)) for b in msg.content if b.type == "tool_use")
        return Answer(text or None, calls, self._STOP[msg.stop_reason], dict(raw.headers))

    def _messages_stream(self, kw: dict[str, Any]) -> Answer:
        blocks: dict[int, dict[str, str]] = {}
        stop = ""
        with self.anthropic.messages.stream(**kw) as s:
            for ev in s:
                if ev.type == "content_block_start":
                    blocks[ev.index] = {"type": ev.content_block.type, "name": getattr(ev.content_block, "name", ""),
                                        "text": "", "json": ""}
                elif ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                    blocks[ev.index]["text"] += ev.delta.text
                elif ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                    blocks[ev.index]["json"] += ev.delta.partial_json
                elif ev.type == "message_delta":
                    stop = ev.delta.stop_reason or stop
            final = s.get_final_message()
            headers = dict(s.response.headers)
        text = "".join(b["text"] for b in blocks.values() if b["type"] == "text")
        calls = tuple((b["name"], b["json"]) for _, b in sorted(blocks.items()) if b["type"] == "tool_use")
        # the SDK's own assembly of the same deltas agrees
        assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
            (n, json.loads(a)) for n, a in calls]
        return Answer(text or None, calls, self._STOP[stop], headers)

    # -- OpenAI Responses
    @staticmethod
    def _responses_answer(resp: Any, headers: dict[str, str]) -> Answer:
        calls = tuple((o.name, o.arguments) for o in resp.output if o.type == "function_call")
        finish = "tool_calls" if calls else "length" if resp.status == "incomplete" else "stop"
        return Answer(resp.output_text or None, calls, finish, headers)

    def _responses_whole(self, kw: dict[str, Any]) -> Answer:
        raw = self.openai.responses.with_raw_response.create(**kw)
        return self._responses_answer(raw.parse(), dict(raw.headers))

    def _responses_stream(self, kw: dict[str, Any]) -> Answer:
        text, calls, last = "", {}, None
        with self.openai.responses.with_streaming_response.create(**kw, stream=True) as raw:
            for ev in raw.parse():
                if ev.type == "response.output_item.added" and ev.item.type == "function_call":
                    calls[ev.output_index] = [ev.item.name, ""]
                elif ev.type == "response.function_call_arguments.delta":
                    calls[ev.output_index][1] += ev.delta
                elif ev.type == "response.output_text.delta":
                    text += ev.delta
                last = ev
        assert last is not None and last.type in ("response.completed", "response.incomplete"), last
        done = self._responses_answer(last.response, dict(raw.headers))
        streamed = Answer(text or None, tuple((n, a) for _, (n, a) in sorted(calls.items())), done.finish,
                          done.headers)
        assert (streamed.content, streamed.calls) == (done.content, done.calls)  # deltas add up to the item
        return streamed
