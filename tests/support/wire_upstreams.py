"""Fake upstreams on loopback that speak Anthropic Messages (POST /v1/messages) and OpenAI Responses
(POST /v1/responses), for targets with `api: messages` / `api: responses`.

Like FakeUpstream they record every body they receive and take faults (give `paths=("/messages",)`
or `("/responses",)`); `truncated` ends a stream after `after_chunks` text deltas without its end
event. They answer "echo: <last user text>", or, when the request has tools and a tool choice
other than none, one call of the first tool with input `{"echo": <last user text>}`, streamed in
`chunk_chars` pieces. A stop sequence found in the reply cuts it there, reported as the API does.
`extra` is merged into every answer object (fields a provider adds); the Messages upstream's
`thinking` (a function of the body) puts a signed thinking block before the text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tests.support.upstream import FakeUpstream, Fault, _Handler

Write = Callable[[dict[str, Any]], None]


def _text_of(content: Any, kinds: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    return " ".join(str(p.get("text", "")) for p in content or () if isinstance(p, dict) and p.get("type") in kinds)


def messages_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user" and (text := _text_of(msg.get("content"), ("text",))):
            return text
    return ""


def responses_user_text(body: dict[str, Any]) -> str:
    items = body.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items or []):
        if item.get("role") == "user" and item.get("type", "message") == "message":
            return _text_of(item.get("content"), ("input_text",))
    return ""


class _WireHandler(_Handler):
    path_suffix = ""

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith(self.path_suffix):
            self._send(404, b'{"type": "error", "error": {"type": "not_found_error", "message": "not found"}}')
            return
        if (body := self._receive()) is None:
            return
        fault = self._fault_for(self.path)
        if self._common_fault(fault):
            return
        owner = self.server.owner
        tool = self._tool(body)
        text = owner.reply(body)
        if not body.get("stream"):
            self._send(200, json.dumps(self._answer(body, text, tool)).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def write(event: dict[str, Any]) -> None:
            data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            self._events(body, text, tool, fault, write)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self._hung_up()

    def _pieces(self, text: str) -> list[str]:
        n = self.server.owner.chunk_chars
        return [text[i : i + n] for i in range(0, len(text), n)]

    def _tool(self, body: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def _answer(self, body: dict[str, Any], text: str, tool: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _events(self, body: dict[str, Any], text: str, tool: str | None, fault: Fault | None, write: Write) -> None:
        raise NotImplementedError


def _cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    at, stop = min(hits)
    return text[:at], stop


class _MessagesHandler(_WireHandler):
    path_suffix = "/messages"

    def _tool(self, body: dict[str, Any]) -> str | None:
        tools = body.get("tools") or []
        if not tools or (body.get("tool_choice") or {}).get("type") == "none":
            return None
        return str(tools[0]["name"])

    def _answer(self, body: dict[str, Any], text: str, tool: str | None) -> dict[str, Any]:
        owner = self.server.owner
        text, stop = _cut(text, body.get("stop_sequences") or [])
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        reason = "stop_sequence" if stop else "end_turn"
        if tool is not None:
            content = [{"type": "tool_use", "id": "toolu_1", "name": tool, "input": {"echo": messages_user_text(body)}}]
            reason = "tool_use"
        if owner.thinking is not None:
            content.insert(0, {"type": "thinking", "thinking": owner.thinking(body), "signature": "sig-1"})
        return {"id": "msg_test", "type": "message", "role": "assistant", "model": owner.model, "content": content,
                "stop_reason": reason, "stop_sequence": stop,
                "usage": {"input_tokens": 11, "output_tokens": 7, "cache_read_input_tokens": 2}, **owner.extra}

    def _events(self, body: dict[str, Any], text: str, tool: str | None, fault: Fault | None, write: Write) -> None:
        owner = self.server.owner
        text, stop = _cut(text, body.get("stop_sequences") or [])
        write({"type": "message_start", "message": {
            "id": "msg_test", "type": "message", "role": "assistant", "model": owner.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 1},
            **owner.extra}})
        write({"type": "ping"})
        at = 0  # the index of the answer's block
        if owner.thinking is not None:
            write({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
            for piece in self._pieces(owner.thinking(body)):
                write({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": piece}})
            write({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig-1"}})
            write({"type": "content_block_stop", "index": 0})
            at = 1
        if tool is not None:
            write({"type": "content_block_start", "index": at,
                   "content_block": {"type": "tool_use", "id": "toolu_1", "name": tool, "input": {}}})
            for piece in self._pieces(json.dumps({"echo": messages_user_text(body)})):
                write({"type": "content_block_delta", "index": at,
                       "delta": {"type": "input_json_delta", "partial_json": piece}})
            reason = "tool_use"
        else:
            write({"type": "content_block_start", "index": at, "content_block": {"type": "text", "text": ""}})
            for i, piece in enumerate(self._pieces(text)):
                if fault is not None and fault.kind == "truncated" and i == fault.after_chunks:
                    self.close_connection = True
                    return
                write({"type": "content_block_delta", "index": at, "delta": {"type": "text_delta", "text": piece}})
                if owner.chunk_delay:
                    time.sleep(owner.chunk_delay)
            reason = "stop_sequence" if stop else "end_turn"
        write({"type": "content_block_stop", "index": at})
        write({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": stop},
               "usage": {"output_tokens": 7}})
        write({"type": "message_stop"})


class _ResponsesHandler(_WireHandler):
    path_suffix = "/responses"

    def _tool(self, body: dict[str, Any]) -> str | None:
        tools = body.get("tools") or []
        if not tools or body.get("tool_choice") in (None, "none"):
            return None
        return str(tools[0]["name"])

    def _response(self, status: str, output: list[dict[str, Any]], usage: bool) -> dict[str, Any]:
        return {**self.server.owner.extra, "id": "resp_test", "object": "response", "created_at": int(time.time()),
                "status": status, "model": self.server.owner.model, "output": output,
                "usage": {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}} if usage else None}

    def _answer(self, body: dict[str, Any], text: str, tool: str | None) -> dict[str, Any]:
        if tool is not None:
            output = [{"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1",
                       "name": tool, "arguments": json.dumps({"echo": responses_user_text(body)})}]
        else:
            output = [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        return self._response("completed", output, True)

    def _events(self, body: dict[str, Any], text: str, tool: str | None, fault: Fault | None, write: Write) -> None:
        owner = self.server.owner
        seq = iter(range(10_000))

        def ev(kind: str, **fields: Any) -> None:
            write({"type": kind, **fields, "sequence_number": next(seq)})

        ev("response.created", response=self._response("in_progress", [], False))
        ev("response.in_progress", response=self._response("in_progress", [], False))
        if tool is not None:
            args = json.dumps({"echo": responses_user_text(body)})
            item = {"id": "fc_1", "type": "function_call", "status": "in_progress", "call_id": "call_1",
                    "name": tool, "arguments": ""}
            ev("response.output_item.added", output_index=0, item=item)
            for piece in self._pieces(args):
                ev("response.function_call_arguments.delta", item_id="fc_1", output_index=0, delta=piece)
            ev("response.function_call_arguments.done", item_id="fc_1", output_index=0, arguments=args)
            done = {**item, "status": "completed", "arguments": args}
        else:
            item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
            ev("response.output_item.added", output_index=0, item=item)
            ev("response.content_part.added", item_id="msg_1", output_index=0, content_index=0,
               part={"type": "output_text", "text": "", "annotations": []})
            for i, piece in enumerate(self._pieces(text)):
                if fault is not None and fault.kind == "truncated" and i == fault.after_chunks:
                    self.close_connection = True
                    return
                ev("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta=piece)
                if owner.chunk_delay:
                    time.sleep(owner.chunk_delay)
            part = {"type": "output_text", "text": text, "annotations": []}
            ev("response.output_text.done", item_id="msg_1", output_index=0, content_index=0, text=text)
            ev("response.content_part.done", item_id="msg_1", output_index=0, content_index=0, part=part)
            done = {**item, "status": "completed", "content": [part]}
        ev("response.output_item.done", output_index=0, item=done)
        ev("response.completed", response=self._response("completed", [done], True))


class MessagesUpstream(FakeUpstream):
    handler = _MessagesHandler

    def __init__(self, **kw: Any) -> None:
        super().__init__(reply=kw.pop("reply", None) or (lambda body: "echo: " + messages_user_text(body)), **kw)
        self.extra: dict[str, Any] = {}
        self.thinking: Callable[[dict[str, Any]], str] | None = None

    def reset(self) -> None:
        super().reset()
        self.extra, self.thinking = {}, None


class ResponsesUpstream(FakeUpstream):
    handler = _ResponsesHandler

    def __init__(self, **kw: Any) -> None:
        super().__init__(reply=kw.pop("reply", None) or (lambda body: "echo: " + responses_user_text(body)), **kw)
        self.extra: dict[str, Any] = {}

    def reset(self) -> None:
        super().reset()
        self.extra = {}
