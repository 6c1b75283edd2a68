"""The wire adapters as pure functions: conversions in, answers and stream events out (validated
against the SDKs' own types), with no server involved."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.schema import APIError
from gateway.wire import anthropic_messages as am
from gateway.wire import responses_in, responses_out

A_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
R_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
            **extra}


def tool_delta(index: int, call_id: str | None = None, name: str | None = None, args: str = "") -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return chunk({"tool_calls": [call]})


USAGE = {"id": "c", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
MIXED = [chunk({"role": "assistant", "content": "Let me "}), chunk({"content": "check."}),
         tool_delta(0, "call_a", "f", '{"x": '), tool_delta(0, args="1}"), tool_delta(1, "call_b", "g", "{}"),
         chunk(finish="tool_calls"), USAGE]


def anthropic_events(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    t = am.MessagesStream("auto")
    events = [e for c in chunks for e in t.feed(c)] + t.finish()
    assert t.finish() == [] and t.feed(chunk({"content": "late"})) == []  # one terminal event, then nothing
    return events


def test_anthropic_in_covers_every_position() -> None:
    req = am.MessagesRequest.model_validate({
        "model": "auto", "max_tokens": 9, "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                              {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": "é"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "r1"}]},
                {"type": "tool_result", "tool_use_id": "t2", "is_error": True}]},
        ]})
    body = am.to_chat(req)
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": "é"}'}}]}
    assert body["messages"][2:] == [{"role": "tool", "tool_call_id": "t1", "content": [{"type": "text", "text": "r1"}]},
                                    {"role": "tool", "tool_call_id": "t2", "content": ""}]
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert "stream" not in body


def test_anthropic_image_in_a_tool_result_is_refused_clearly() -> None:
    req = am.MessagesRequest.model_validate({"model": "auto", "max_tokens": 9, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]})
    with pytest.raises(APIError) as exc:
        am.to_chat(req)
    assert exc.value.status == 400 and exc.value.param == "messages.0.content.0"


def test_anthropic_out_maps_stop_reasons_and_keeps_broken_arguments() -> None:
    req = am.MessagesRequest.model_validate({"model": "auto", "max_tokens": 9, "messages": [
        {"role": "user", "content": "q"}]})
    response = {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 9}, "choices": [{
        "finish_reason": "length", "message": {"role": "assistant", "content": "partial", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": '}}]}}]}
    msg = Message.model_validate(am.from_chat(response, req))
    assert msg.stop_reason == "max_tokens" and msg.content[0].text == "partial"
    assert msg.content[1].input == {"arguments": '{"a": '}


def test_anthropic_stream_opens_and_closes_one_block_at_a_time() -> None:
    events = anthropic_events(MIXED)
    for e in events:
        A_EVENT.validate_python(e)
    starts = [(e["index"], e["content_block"]["type"]) for e in events if e["type"] == "content_block_start"]
    assert starts == [(0, "text"), (1, "tool_use"), (2, "tool_use")]
    opened: list[int] = []
    for e in events:  # every start is stopped before the next one opens
        if e["type"] == "content_block_start":
            assert not opened
            opened.append(e["index"])
        elif e["type"] == "content_block_stop":
            assert opened == [e["index"]]
            opened.clear()
        elif e["type"] == "content_block_delta":
            assert opened == [e["index"]]
    delta = events[-2]
    assert delta["delta"]["stop_reason"] == "tool_use" and {k: delta["usage"][k] for k in ("input_tokens", "output_tokens")} == {"input_tokens": 3, "output_tokens": 4}


def test_anthropic_stream_error_closes_the_open_block_and_ends_the_stream() -> None:
    events = anthropic_events([chunk({"content": "par"}), {"error": {"message": "gone (timeout)"}}])
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                           "content_block_stop", "error"]
    assert ErrorResponse.model_validate(events[-1]).error.type == "api_error"


def test_anthropic_error_types_follow_the_status() -> None:
    kinds = {s: am.error_body(APIError(s, "m"))["error"]["type"] for s in (400, 401, 403, 404, 413, 429, 500, 503)}
    assert kinds == {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                     500: "api_error", 503: "overloaded_error"}
    for s in kinds:
        ErrorResponse.model_validate(am.error_body(APIError(s, "m")))


def _responses_req(**fields: Any) -> responses_in.ResponsesRequest:
    return responses_in.ResponsesRequest.model_validate({"model": "auto", "input": "q", **fields})


def test_responses_in_merges_one_assistant_turn_and_drops_reasoning() -> None:
    body = responses_in.to_chat(_responses_req(input=[
        {"role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "2"}]},
    ]))
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    assert msgs[1]["content"] == "Let me see." and [c["id"] for c in msgs[1]["tool_calls"]] == ["a", "b"]
    assert msgs[3]["content"] == [{"type": "text", "text": "2"}]


def test_responses_out_is_incomplete_when_cut_by_the_token_limit() -> None:
    response = {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 9},
                "choices": [{"finish_reason": "length", "message": {"role": "assistant", "content": "partial"}}]}
    resp = Response.model_validate(responses_out.from_chat(response, _responses_req(max_output_tokens=9)))
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == "partial" and resp.max_output_tokens == 9


def responses_events(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    t = responses_out.ResponsesStream(_responses_req(stream=True))
    events = [e for c in chunks for e in t.feed(c)] + t.finish()
    assert t.finish() == []
    for e in events:
        R_EVENT.validate_python(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_responses_stream_closes_the_message_before_the_function_calls() -> None:
    events = responses_events(MIXED)
    items = [(e["type"], e["output_index"], e["item"]["type"]) for e in events if "item" in e]
    assert items == [("response.output_item.added", 0, "message"), ("response.output_item.done", 0, "message"),
                     ("response.output_item.added", 1, "function_call"), ("response.output_item.done", 1, "function_call"),
                     ("response.output_item.added", 2, "function_call"), ("response.output_item.done", 2, "function_call")]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"]) for e in done] == [("f", '{"x": 1}'), ("g", "{}")]
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.completed" and final.output_text == "Let me check."
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    assert final.usage is not None and final.usage.total_tokens == 7


def test_responses_stream_failure_is_the_only_terminal_event() -> None:
    events = responses_events([chunk({"content": "par"}), {"error": {"message": "gone (timeout)"}}])
    assert [e["type"] for e in events][-1] == "response.failed"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error is not None and failed.output[0].status == "incomplete"


def test_responses_stream_cut_by_the_token_limit_is_incomplete() -> None:
    events = responses_events([chunk({"content": "par"}), chunk(finish="length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


# -- the chat hub out to Messages / Responses targets (gateway/wire/to_*.py) ----------------------


def _hub_body() -> dict[str, Any]:
    return {"model": "m", "temperature": 1.5, "stop": "END", "parallel_tool_calls": False, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
            "messages": [
                {"role": "system", "content": "sys"}, {"role": "developer", "content": "dev"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                    {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "r2"}]},
                {"role": "user", "content": [{"type": "text", "text": "and?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": "So far "}]}


def test_chat_to_messages_merges_turns_and_keeps_the_prefill() -> None:
    from gateway.wire import to_messages

    out = to_messages.request(_hub_body(), "claude")
    assert out["system"] == "sys\ndev" and out["temperature"] == 1.0 and out["stop_sequences"] == ["END"]
    assert out["max_tokens"] == to_messages.DEFAULT_MAX_TOKENS and "response_format" not in out
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [b["input"] for b in out["messages"][1]["content"]] == [{"x": 1}, {"arguments": "not json"}]
    assert [b["type"] for b in out["messages"][2]["content"]] == ["tool_result", "tool_result", "text", "image"]
    assert out["messages"][2]["content"][1]["content"] == "r2"
    assert out["messages"][2]["content"][3]["source"] == {"type": "base64", "media_type": "image/png", "data": "AAAA"}
    assert out["messages"][3]["content"] == [{"type": "text", "text": "So far"}]  # a prefill may not end in a space


def test_messages_stream_errors_are_backend_errors() -> None:
    from gateway.backends.base import BackendError
    from gateway.wire import to_messages

    reader = to_messages.EventReader("claude")
    with pytest.raises(BackendError) as err:
        reader.feed({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert err.value.status == 529 and err.value.retryable
    with pytest.raises(BackendError, match="outside a tool_use"):
        reader.feed({"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": "{"}})
    assert not reader.finished and reader.feed({"type": "message_stop"})[0]["choices"] == [] and reader.finished


def test_chat_to_responses_and_back() -> None:
    from gateway.backends.base import BackendError
    from gateway.wire import to_responses

    out = to_responses.request(_hub_body(), "gpt")
    assert out["instructions"] == "sys\ndev" and out["store"] is False and "stop" not in out
    assert [i["type"] for i in out["input"]] == ["message", "function_call", "function_call", "function_call_output",
                                                 "function_call_output", "message", "message"]
    assert out["input"][5]["content"][1] == {"type": "input_image", "image_url": "data:image/png;base64,AAAA",
                                             "detail": "auto"}
    assert out["text"] == {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}}
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    cut = to_responses.completion({"object": "response", "status": "incomplete", "output": [],
                                   "incomplete_details": {"reason": "max_output_tokens"}}, "gpt")
    assert cut["choices"][0]["finish_reason"] == "length"
    with pytest.raises(BackendError):
        to_responses.completion({"object": "response", "status": "failed", "output": []}, "gpt")
    with pytest.raises(BackendError, match="not a Responses response"):
        to_responses.completion({"choices": []}, "gpt")
