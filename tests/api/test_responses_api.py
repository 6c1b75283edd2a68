"""POST /v1/responses with the official openai SDK as the client, against fake chat upstreams.

Every response and every stream event is validated against the SDK's own pydantic types; what the
cloud received is checked for the raw values a redacting rule must keep from it.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from tests.api.conftest import CARD, EMAIL, KEY, TAIL, audit_line, post, sse
from tests.support.gateway import RunningGateway
from tests.support.tool_upstream import ToolStreamingUpstream
from tests.support.upstream import Fault

EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
PRIVATE = {"x-route": "private"}
TOOLS = [{"type": "function", "name": "send_mail", "description": "Send an e-mail", "strict": False,
          "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}]
TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}


def sdk(gw: RunningGateway, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0, timeout=30)


def history() -> list[dict[str, Any]]:
    """A function-call round trip carrying the planted values in arguments and output."""
    return [
        {"role": "user", "content": [{"type": "input_text", "text": f"Mail {EMAIL} my card number."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sending it."}]},
        {"type": "function_call", "call_id": "call_9", "name": "send_mail",
         "arguments": json.dumps({"to": EMAIL, "body": f"card {CARD}"})},
        {"type": "function_call_output", "call_id": "call_9", "output": f"delivered to {EMAIL}"},
        {"role": "user", "content": f"Now confirm {EMAIL} got it"},
    ]


def validated(events: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    out = [EVENT.validate_python(data) for _, data in events]
    assert [name for name, _ in events] == [e.type for e in out]
    assert [e.sequence_number for e in out] == list(range(len(out)))
    assert sum(e.type in TERMINAL for e in out) == 1 and out[-1].type in TERMINAL
    return out


def test_create_against_the_local_target(gw: RunningGateway) -> None:
    raw = sdk(gw).responses.with_raw_response.create(model="auto", input="hello", instructions="Be brief.",
                                                     metadata={"ticket": "7"})
    assert raw.headers["x-hybrid-route"] == "local"
    resp = Response.model_validate(json.loads(raw.http_response.text))
    assert resp.status == "completed" and resp.output_text == "local answer"
    assert resp.instructions == "Be brief." and resp.metadata == {"ticket": "7"}
    assert resp.usage is not None and resp.usage.input_tokens == 5 and resp.usage.total_tokens == 12


def test_the_schema_check_is_strict() -> None:
    ok = json.loads(Response(id="r", created_at=1, model="m", object="response", output=[], parallel_tool_calls=True,
                             tool_choice="auto", tools=[]).model_dump_json())
    for field in ("id", "output", "tool_choice"):
        with pytest.raises(ValidationError):
            Response.model_validate({k: v for k, v in ok.items() if k != field})
    with pytest.raises(ValidationError):
        EVENT.validate_python({"type": "response.output_text.delta", "item_id": "m", "output_index": 0,
                               "content_index": 0, "delta": "x", "logprobs": []})  # no sequence_number


def test_request_fields_reach_the_upstream_as_chat(gw: RunningGateway, cloud: ToolStreamingUpstream) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    resp = sdk(gw).responses.create(
        model="auto", instructions="Rules.", max_output_tokens=40, temperature=0.3, top_p=0.8,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        input=[{"role": "user", "content": [
            {"type": "input_text", "text": "what is this"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}]}],
        tools=TOOLS, tool_choice={"type": "function", "name": "send_mail"}, parallel_tool_calls=False,
        extra_headers={"x-route": "cloud"})
    got = cloud.received[-1]
    assert got["messages"][0] == {"role": "system", "content": "Rules."}
    assert got["messages"][1]["content"][1] == {"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
    assert got["max_tokens"] == 40 and got["temperature"] == 0.3 and got["top_p"] == 0.8
    assert got["response_format"] == {"type": "json_schema",
                                      "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    assert got["tools"] == [{"type": "function", "function": {"name": "send_mail", "description": "Send an e-mail",
                                                              "parameters": TOOLS[0]["parameters"], "strict": False}}]
    assert got["tool_choice"] == {"type": "function", "function": {"name": "send_mail"}}
    assert got["parallel_tool_calls"] is False
    assert resp.text.format.type == "json_schema" and resp.tools[0].name == "send_mail"


def test_stream_events_in_order(gw: RunningGateway) -> None:
    events = validated(sse(gw, "/v1/responses", {"model": "auto", "input": "hi", "stream": True}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "local answer"
    done = events[-1].response
    assert done.status == "completed" and done.output_text == "local answer" and done.usage.output_tokens > 0
    assert events[0].response.status == "in_progress" and events[0].response.id == done.id


def test_sdk_stream_helper(gw: RunningGateway) -> None:
    with sdk(gw).responses.stream(model="auto", input="hi", extra_headers={"x-route": "cloud"}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "echo: hi" and final.output_text == "echo: hi"


def test_function_call_history_with_pii_is_redacted_and_restored(gw: RunningGateway,
                                                                 cloud: ToolStreamingUpstream) -> None:
    raw = sdk(gw).responses.with_raw_response.create(
        model="auto", instructions=f"Escalate to {EMAIL}.", input=history(), tools=TOOLS, tool_choice="auto",
        extra_headers=PRIVATE)
    resp = Response.model_validate(json.loads(raw.http_response.text))
    sent = json.dumps(cloud.received)
    assert EMAIL not in sent and CARD not in sent and "<EMAIL_ADDRESS_1>" in sent
    got = cloud.received[-1]["messages"]
    assert [m["role"] for m in got] == ["system", "user", "assistant", "tool", "user"]
    assert got[2]["content"] == "Sending it." and got[2]["tool_calls"][0]["id"] == "call_9"
    assert json.loads(got[2]["tool_calls"][0]["function"]["arguments"])["to"] == "<EMAIL_ADDRESS_1>"
    assert got[3] == {"role": "tool", "tool_call_id": "call_9", "content": "delivered to <EMAIL_ADDRESS_1>"}
    (call,) = resp.output
    assert call.type == "function_call" and call.name == "send_mail" and call.call_id == "call_1"
    assert json.loads(call.arguments) == {"echo": f"Now confirm {EMAIL} got it"}


def test_streamed_function_call_arguments_are_restored(gw: RunningGateway, cloud: ToolStreamingUpstream) -> None:
    events = validated(sse(gw, "/v1/responses", {"model": "auto", "stream": True, "input": history(),
                                                 "tools": TOOLS, "tool_choice": "required"}, headers=PRIVATE))
    assert EMAIL not in json.dumps(cloud.received)
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    want = {"echo": f"Now confirm {EMAIL} got it"}
    assert json.loads(deltas) == want and json.loads(events[-3].arguments) == want
    with sdk(gw).responses.stream(model="auto", input=history(), tools=TOOLS, tool_choice="required",
                                  extra_headers=PRIVATE) as stream:
        final = stream.get_final_response()
    assert json.loads(final.output[0].arguments) == want


@pytest.mark.parametrize("fault", [Fault("status", status=502), Fault("reset")], ids=lambda f: f.kind)
def test_cloud_dead_before_the_first_token_falls_back(gw: RunningGateway, cloud: ToolStreamingUpstream,
                                                      fault: Fault) -> None:
    cloud.fault = fault
    events = validated(sse(gw, "/v1/responses", {"model": "auto", "input": "hi", "stream": True},
                           headers={"x-route": "cloud"}))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "local answer"


def test_cloud_dying_mid_stream_is_continued_with_one_terminal_event(gw: RunningGateway,
                                                                     cloud: ToolStreamingUpstream) -> None:
    cloud.fault = Fault("truncated", after_chunks=3)
    events = validated(sse(gw, "/v1/responses", {"model": "auto", "input": "tell me something long",
                                                 "stream": True}, headers={"x-route": "cloud"}))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "echo: tell m" + TAIL


def test_unrecoverable_mid_stream_break_is_one_response_failed(gw: RunningGateway,
                                                               cloud: ToolStreamingUpstream) -> None:
    cloud.fault = Fault("truncated", after_chunks=2)
    events = validated(sse(gw, "/v1/responses", {"model": "auto", "input": "tell me something long",
                                                 "stream": True}, headers={"x-route": "cloud-only"}))
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error is not None and "interrupted" in failed.response.error.message
    assert failed.response.output[0].content[0].text == "echo: te"  # what had arrived


def test_stateless_parameters_are_refused(gw: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as prev:
        sdk(gw).responses.create(model="auto", input="hi", previous_response_id="resp_123")
    assert prev.value.body["param"] == "previous_response_id" and "stateless" in prev.value.body["message"]
    with pytest.raises(openai.BadRequestError) as store:
        sdk(gw).responses.create(model="auto", input="hi", store=True)
    assert store.value.body["code"] == "unsupported_parameter"
    assert sdk(gw).responses.create(model="auto", input="hi", store=False).output_text == "local answer"


@pytest.mark.parametrize("body, where", [
    ({"input": 42}, "input"),
    ({"input": [{"type": "message", "role": "robot", "content": "x"}]}, "input.0"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.content"),
    ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_types_are_400s_in_openais_shape(gw: RunningGateway, body: dict[str, Any], where: str) -> None:
    r = post(gw, "/v1/responses", {"model": "auto", "input": "hi", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"].startswith(where)


def test_sdk_raises_its_typed_exceptions(gw: RunningGateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk(gw, key="wrong").responses.create(model="auto", input="hi")
    with pytest.raises(openai.NotFoundError) as missing:
        sdk(gw).responses.create(model="no-such-model", input="hi")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        sdk(gw).responses.create(model="auto", input="hi", extra_headers={"x-team": "blocked"})


def test_audit_lines_name_the_endpoint(gw: RunningGateway) -> None:
    ok = post(gw, "/v1/responses", {"model": "auto", "input": "hi", "stream": True},
              headers={"x-request-id": "req-resp-ok"})
    assert ok.status_code == 200
    record = audit_line(gw, "req-resp-ok")
    assert record["endpoint"] == "/v1/responses" and record["stream"] is True and record["completion_tokens"] > 0
