"""OpenAI Responses (POST /v1/responses) <-> the chat-completions body the pipeline runs on.

In: `instructions` -> a system message; `input` as a string (one user message) or items: messages
(input_text / output_text / input_image parts), `function_call` items -> assistant `tool_calls`,
`function_call_output` items -> `role: tool` messages; flat function tools -> chat tools;
`text.format` -> `response_format`; `max_output_tokens` -> `max_tokens`. Reasoning items of
earlier turns have no chat equivalent and are dropped. Stateless: `previous_response_id`,
`conversation` and `store: true` are refused with a 400. Out: a `response` object (message and
`function_call` output items, usage) or the stream's event lifecycle, each event numbered.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from gateway.classify.text import content_text
from gateway.schema import APIError
from gateway.wire.base import (
    ChatChunkTranslator,
    Event,
    OpenModel,
    WireAdapter,
    bad,
    chat_usage,
    check,
    new_id,
    tool_calls_of,
)

PATH = "/v1/responses"


class TextPart(OpenModel):
    type: Literal["input_text", "output_text"]
    text: str


class ImagePart(OpenModel):
    type: Literal["input_image"]
    image_url: str | None = None
    detail: str | None = None


class RefusalPart(OpenModel):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[TextPart | ImagePart | RefusalPart, Field(discriminator="type")]
_PARTS: TypeAdapter[Any] = TypeAdapter(list[Part])


class MessageItem(OpenModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]


class FunctionCallItem(OpenModel):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(OpenModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]


class ReasoningItem(OpenModel):
    type: Literal["reasoning"]


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")]
_ITEM: TypeAdapter[Any] = TypeAdapter(Item)


class FunctionTool(OpenModel):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


_TOOL: TypeAdapter[FunctionTool] = TypeAdapter(FunctionTool)


class TextFormat(OpenModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(OpenModel):
    format: TextFormat | None = None


class ResponsesRequest(OpenModel):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    stream: bool | None = False
    user: str | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    store: bool | None = None


# -- in -----------------------------------------------------------------------------------------


def _stateless(req: ResponsesRequest) -> None:
    for name in ("previous_response_id", "conversation"):
        if getattr(req, name) is not None:
            raise APIError(400, f"`{name}` is not supported: this gateway is stateless and stores no responses; "
                           "send the whole conversation in `input`.", param=name, code="unsupported_parameter")
    if req.store:
        raise APIError(400, "`store: true` is not supported: this gateway is stateless and stores no responses; "
                       "send `store: false`.", param="store", code="unsupported_parameter")


def _parts(content: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in check(_PARTS, content, where):
        if isinstance(part, TextPart):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, RefusalPart):
            out.append({"type": "text", "text": part.refusal})
        elif part.image_url:
            image: dict[str, Any] = {"url": part.image_url}
            if part.detail:
                image["detail"] = part.detail
            out.append({"type": "image_url", "image_url": image})
        else:
            raise bad("input_image needs `image_url` (file ids are not supported)", where)
    return out


def _message(item: MessageItem, where: str) -> dict[str, Any]:
    if isinstance(item.content, str):
        return {"role": item.role, "content": item.content}
    parts = _parts(item.content, f"{where}.content")
    if item.role == "user":
        return {"role": "user", "content": parts}
    if any(p["type"] != "text" for p in parts):
        raise bad(f"a {item.role} message holds text only", f"{where}.content")
    return {"role": item.role, "content": "".join(p["text"] for p in parts)}


def _items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i, raw in enumerate(items):
        where = f"input.{i}"
        if isinstance(raw, dict) and "type" not in raw and "role" in raw:
            raw = {**raw, "type": "message"}  # the "easy" message form has no type
        item = check(_ITEM, raw, where)
        if isinstance(item, MessageItem):
            messages.append(_message(item, where))
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            # consecutive calls, and calls right after the assistant's text, are one chat turn
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _parts(item.output, f"{where}.output")
            if isinstance(output, list) and any(p["type"] != "text" for p in output):
                raise bad("function_call_output holds text only", f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return messages


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for k, raw in enumerate(tools):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind != "function":
            raise bad(f"only function tools are supported, not `{str(kind)[:60]}`", f"tools.{k}")
        tool = check(_TOOL, raw, f"tools.{k}")
        fn: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object", "properties": {}}}
        if tool.description is not None:
            fn["description"] = tool.description
        if tool.strict is not None:
            fn["strict"] = tool.strict
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad("expected auto, none, required or {\"type\": \"function\", \"name\": ...}", "tool_choice")


def _response_format(fmt: TextFormat) -> dict[str, Any] | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if not fmt.name or fmt.schema_ is None:
        raise bad("json_schema needs `name` and `schema`", "text.format")
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


def to_chat(req: ResponsesRequest) -> dict[str, Any]:
    _stateless(req)
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        messages.extend(_items(req.input))
    if not messages:
        raise bad("needs at least one message", "input")
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "parallel_tool_calls", "metadata", "user"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.tools:
        body["tools"] = _tools(req.tools)
        if req.tool_choice is not None:
            body["tool_choice"] = _tool_choice(req.tool_choice)
    if req.text is not None and req.text.format is not None:
        fmt = _response_format(req.text.format)
        if fmt is not None:
            body["response_format"] = fmt
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # response.completed reports the usage
    return body


# -- out ----------------------------------------------------------------------------------------


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
        "tools": [_echo_tool(check(_TOOL, t, "tools")) for t in req.tools or []],
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


def error_body(err: APIError) -> dict[str, Any]:
    return err.body()


class OpenAIResponses(WireAdapter):
    endpoint = PATH
    request_model = ResponsesRequest
    api = "responses"

    def to_chat(self, request: ResponsesRequest) -> dict[str, Any]:
        return to_chat(request)

    def from_chat(self, response: dict[str, Any], request: ResponsesRequest) -> dict[str, Any]:
        return from_chat(response, request)

    def translator(self, request: ResponsesRequest, input_tokens: int, request_id: str) -> ResponsesStream:
        return ResponsesStream(request)

    def native_answer(self, answer: dict[str, Any], request: ResponsesRequest) -> dict[str, Any]:
        return native_response(answer, _skeleton(request, str(answer.get("model") or request.model)))

    def error_body(self, err: APIError) -> dict[str, Any]:
        return error_body(err)
