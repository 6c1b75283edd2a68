"""OpenAI Responses requests (POST /v1/responses) in: the request model, and the chat-completions
body the pipeline runs on.

`instructions` -> a system message; `input` as a string (one user message) or items: messages
(input_text / output_text / input_image parts), `function_call` items -> assistant `tool_calls`,
`function_call_output` items -> `role: tool` messages; flat function tools -> chat tools;
`text.format` -> `response_format`; `max_output_tokens` -> `max_tokens`. Reasoning items of
earlier turns have no chat equivalent and are dropped. Stateless: `previous_response_id`,
`conversation` and `store: true` are refused with a 400. The answer's way out is
gateway/wire/responses_out.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from gateway.schema import APIError
from gateway.wire.base import OpenModel, bad, check


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



def _stateless(req: ResponsesRequest) -> None:
    for name, value in (("previous_response_id", req.previous_response_id), ("conversation", req.conversation)):
        if value is not None:
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
        tool = parse_tool(raw, f"tools.{k}")
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


def parse_tool(raw: Any, where: str) -> FunctionTool:
    tool: FunctionTool = check(_TOOL, raw, where)
    return tool


# Fields chat completions takes as they are.
_PASSED_ON = {"temperature", "top_p", "parallel_tool_calls", "metadata", "user"}


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
    body.update(req.model_dump(include=_PASSED_ON, exclude_none=True))
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
