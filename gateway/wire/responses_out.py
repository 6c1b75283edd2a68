"""OpenAI Responses answers out: the `response` object (message and `function_call` output items,
usage) or the stream's event lifecycle, each event numbered, built from the pipeline's chat
completion or chunks; a Responses upstream's own answer (pass-through) completed to the published
schema. The request's way in is gateway/wire/responses_in.py.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.classify.text import content_text
from gateway.wire.base import ChatChunkTranslator, Event, chat_usage, new_id, tool_calls_of
from gateway.wire.responses_in import FunctionTool, ResponsesRequest, parse_tool


def _skeleton(req: ResponsesRequest, model: str) -> dict[str, Any]:
    """The response object's fields that echo the request."""
    return {
        "id": new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "model": model,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
        "previous_response_id": None,
        "store": False,
        "temperature": req.temperature,
        "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
        if req.text is not None and req.text.format is not None else {"format": {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": [_echo_tool(parse_tool(t, "tools")) for t in req.tools or []],
        "top_p": req.top_p,
        "truncation": "disabled",
        # `usage` and `user` are typed object / string in the published schema: absent, not null
        **({"user": req.user} if req.user is not None else {}),
    }


def _echo_tool(tool: FunctionTool) -> dict[str, Any]:
    """A request's function tool as the response repeats it (`strict` and `parameters` required)."""
    out = tool.model_dump(exclude_none=True)
    out.setdefault("parameters", None)
    out["strict"] = tool.strict
    return out


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _finished(response: dict[str, Any], finish_reason: str | None, usage: tuple[int, int]) -> dict[str, Any]:
    response["usage"] = _usage(*usage)
    if finish_reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    elif finish_reason == "content_filter":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "content_filter"}
    else:
        response["status"] = "completed"
    response["completed_at"] = int(time.time()) if response["status"] == "completed" else None
    return response


def from_chat(response: dict[str, Any], req: ResponsesRequest) -> dict[str, Any]:
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    out = _skeleton(req, response.get("model") or req.model)
    text = content_text(message.get("content"))
    if text:
        out["output"].append({"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "completed",
                              "content": [_text_part(text)]})
    for call in tool_calls_of(message):
        fn = call.get("function") or {}
        out["output"].append({"id": new_id("fc_"), "type": "function_call", "status": "completed",
                              "call_id": call.get("id") or new_id("call_"), "name": fn.get("name") or "",
                              "arguments": fn.get("arguments") or ""})
    return _finished(out, choice.get("finish_reason"), chat_usage(response))


def _native_part(part: Any) -> Any:
    if isinstance(part, dict) and part.get("type") == "output_text":
        return {"annotations": [], "logprobs": [], **part}
    return part


def _native_item(item: Any) -> Any:
    """An upstream's output item with what the published schema requires."""
    if not isinstance(item, dict):
        return item
    if item.get("type") == "message" and isinstance(item.get("content"), list):
        return {**item, "content": [_native_part(p) for p in item["content"]]}
    return item


def native_response(response: dict[str, Any], echo: dict[str, Any]) -> dict[str, Any]:
    """A Responses upstream's own `response` (a pass-through answer), as it came, completed with
    the request's `echo` (its `_skeleton`) where the upstream left a required field out."""
    out = {**echo, **response}
    if out.get("user") is None:
        out.pop("user", None)  # typed string: absent, not null
    if isinstance(response.get("usage"), dict):
        usage = response["usage"]
        base = _usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))
        out["usage"] = {**base, **usage, "input_tokens_details": {**base["input_tokens_details"],
                                                                  **(usage.get("input_tokens_details") or {})},
                        "output_tokens_details": {**base["output_tokens_details"],
                                                  **(usage.get("output_tokens_details") or {})}}
    elif out.get("usage") is None:
        out.pop("usage", None)  # typed object: absent, not null
    out["output"] = [_native_item(i) for i in out.get("output") or []]
    if out.get("status") == "completed":
        out.setdefault("completed_at", int(time.time()))
    return out


def _native_event(event: Event, echo: dict[str, Any]) -> Event:
    if isinstance(event.get("response"), dict):
        return {**event, "response": native_response(event["response"], echo)}
    if isinstance(event.get("item"), dict):
        return {**event, "item": _native_item(event["item"])}
    if isinstance(event.get("part"), dict):
        return {**event, "part": _native_part(event["part"])}
    if event.get("type") in ("response.output_text.delta", "response.output_text.done"):
        return {"logprobs": [], **event}
    return event


def native_answer(answer: dict[str, Any], req: ResponsesRequest) -> dict[str, Any]:
    """A Responses upstream's answer to `req`, completed with the request's echo."""
    return native_response(answer, _skeleton(req, str(answer.get("model") or req.model)))


class ResponsesStream(ChatChunkTranslator):
    """Chat chunks -> response.created, response.in_progress, output items and their parts and
    deltas, then response.completed (response.incomplete when cut by max_output_tokens), or
    response.failed when the stream broke and no target could finish it."""

    def __init__(self, req: ResponsesRequest) -> None:
        super().__init__()
        self.req = req
        self.response: dict[str, Any] | None = None
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the output item being written
        self.tools: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its function_call item
        self.text: list[str] = []
        self.echo: dict[str, Any] | None = None

    def _ev(self, events: list[Event], kind: str, **fields: Any) -> None:
        events.append({"type": kind, **fields, "sequence_number": self.seq})
        self.seq += 1

    def _start(self, events: list[Event], chunk: dict[str, Any]) -> dict[str, Any]:
        if self.response is None:
            self.response = _skeleton(self.req, chunk.get("model") or self.req.model)
            # Snapshots are shallow copies: the translator replaces nested values, never mutates them.
            self._ev(events, "response.created", response={**self.response, "output": []})
            self._ev(events, "response.in_progress", response={**self.response, "output": []})
        return self.response

    def _add(self, events: list[Event], item: dict[str, Any]) -> int:
        assert self.response is not None
        self._close(events)
        self.response["output"].append(item)
        self.open = item
        index = len(self.response["output"]) - 1
        self._ev(events, "response.output_item.added", output_index=index, item=dict(item))
        return index

    def _close(self, events: list[Event]) -> None:
        item, self.open = self.open, None
        if item is None or self.response is None:
            return
        index = self.response["output"].index(item)
        if item["type"] == "message":
            text = "".join(self.text)
            self.text = []
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            self._ev(events, "response.output_text.done", **common, text=text, logprobs=[])
            self._ev(events, "response.content_part.done", **common, part=_text_part(text))
            item["content"] = [_text_part(text)]
        else:
            self._ev(events, "response.function_call_arguments.done", item_id=item["id"], output_index=index,
                     name=item["name"], arguments=item["arguments"])
        item["status"] = "completed"
        self._ev(events, "response.output_item.done", output_index=index, item=dict(item))

    def _text(self, events: list[Event], text: str) -> None:
        if self.open is None or self.open["type"] != "message":
            item = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            index = self._add(events, item)
            self._ev(events, "response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                     part=_text_part(""))
        assert self.open is not None and self.response is not None
        self.text.append(text)
        self._ev(events, "response.output_text.delta", item_id=self.open["id"],
                 output_index=len(self.response["output"]) - 1, content_index=0, delta=text, logprobs=[])

    def _tool(self, events: list[Event], call: dict[str, Any]) -> None:
        assert self.response is not None
        k = int(call.get("index") or 0)
        fn = call.get("function") or {}
        if k not in self.tools:
            item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress",
                    "call_id": call.get("id") or new_id("call_"), "name": fn.get("name") or "", "arguments": ""}
            self.tools[k] = item
            self._add(events, item)
        item = self.tools[k]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            self._ev(events, "response.function_call_arguments.delta", item_id=item["id"],
                     output_index=self.response["output"].index(item), delta=fn["arguments"])

    def _fail(self, events: list[Event], message: str) -> None:
        assert self.response is not None
        if self.open is not None:
            self.open["status"] = "incomplete"
            if self.open["type"] == "message":
                self.open["content"] = [_text_part("".join(self.text))]
        self.response["status"] = "failed"
        self.response["error"] = {"code": "server_error", "message": message}
        self.response["usage"] = _usage(*self.usage)
        self._ev(events, "response.failed", response=self.response)

    def _echo(self) -> dict[str, Any]:
        """The request's echo, once per stream: what a lax upstream's response objects are completed with."""
        if self.echo is None:
            self.echo = _skeleton(self.req, self.req.model)
        return self.echo

    def _native(self, events: list[Event], event: Event) -> None:
        kind = event.get("type")
        if kind in ("response.created", "response.in_progress") and isinstance(event.get("response"), dict):
            self.response = native_response(event["response"], self._echo())
        elif self.response is None:  # an upstream that did not start with response.created
            self._start(events, {})
        assert self.response is not None
        if kind == "response.output_item.added" and isinstance(event.get("item"), dict):
            self.open = _native_item(dict(event["item"]))
            self.response["output"].append(self.open)
            self.text = []
        elif kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            self.text.append(event["delta"])
        elif kind == "response.function_call_arguments.delta" and self.open is not None \
                and self.open.get("type") == "function_call":
            self.open["arguments"] = str(self.open.get("arguments") or "") + str(event.get("delta") or "")
        elif kind == "response.output_item.done" and isinstance(event.get("item"), dict):
            index = int(event.get("output_index") or 0)
            if index < len(self.response["output"]):
                self.response["output"][index] = _native_item(dict(event["item"]))
            self.open, self.text = None, []
        elif kind == "response.function_call_arguments.done" and "name" not in event:
            event = {**event, "name": str((self.open or {}).get("name") or "")}  # required by the schema
        elif kind in ("response.completed", "response.incomplete"):
            self.done = True
        # one numbering for the whole stream, whoever wrote which event
        events.append({**_native_event(event, self._echo()), "sequence_number": self.seq})
        self.seq += 1

    def _end(self, events: list[Event]) -> None:
        assert self.response is not None
        response = _finished(self.response, self.finish_reason, self.usage)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        self._ev(events, kind, response=response)
