"""The fake upstream of tests/support/upstream.py, streaming its tool call too.

FakeUpstream answers a request with tools with a tool call (`{"echo": <last user text>}`) only
when not streaming; this one streams that call as chat chunks, its arguments in `chunk_chars`
pieces, so a placeholder inside them arrives split and the gateway must restore it across chunks.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.support.upstream import FakeUpstream, Fault, _Handler, _last_user_text, owner_wants_tool


def _wanted_tool(body: dict[str, Any]) -> str | None:
    try:
        name = body["tools"][0]["function"]["name"] if owner_wants_tool(body) else None
    except (KeyError, IndexError, TypeError):
        return None
    return name if isinstance(name, str) else None


class _ToolHandler(_Handler):
    def _stream(self, body: dict[str, Any], reply: str, fault: Fault | None) -> None:
        name = _wanted_tool(body)
        if name is None:
            super()._stream(body, reply, fault)
            return
        owner = self.server.owner
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(obj: Any) -> None:
            data = b"data: " + json.dumps(obj).encode() + b"\n\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": owner.model}

        def delta(d: dict[str, Any], finish: str | None = None) -> None:
            event({**base, "choices": [{"index": 0, "delta": d, "finish_reason": finish}]})

        args = json.dumps({"echo": _last_user_text(body)})
        delta({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}]})
        for i in range(0, len(args), owner.chunk_chars):
            delta({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + owner.chunk_chars]}}]})
        delta({}, "tool_calls")
        if (body.get("stream_options") or {}).get("include_usage"):
            event({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}})
        self.wfile.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        self.wfile.flush()


class ToolStreamingUpstream(FakeUpstream):
    handler = _ToolHandler
