"""POST /v1/messages with the official anthropic SDK as the client, against fake chat upstreams.

Every answer and every stream event is validated against the SDK's own pydantic types; what the
cloud received is checked for the raw values a redacting rule must keep from it.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent
from pydantic import TypeAdapter, ValidationError

from tests.api.conftest import CARD, EMAIL, KEY, TAIL, audit_line, post, sse
from tests.support.gateway import RunningGateway
from tests.support.tool_upstream import ToolStreamingUpstream
from tests.support.upstream import Fault

EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
PRIVATE = {"x-route": "private"}
TOOLS = [{"name": "send_mail", "description": "Send an e-mail", "input_schema": {
    "type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}}}}]


def sdk(gw: RunningGateway, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)


def history() -> list[dict[str, Any]]:
    """A tool round trip carrying the planted values in tool_use.input and tool_result content."""
    return [
        {"role": "user", "content": [{"type": "text", "text": f"Mail {EMAIL} my card number."}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Sending it."},
            {"type": "tool_use", "id": "toolu_1", "name": "send_mail",
             "input": {"to": EMAIL, "body": f"card {CARD}"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": f"delivered to {EMAIL}"},
            {"type": "text", "text": f"Now confirm {EMAIL} got it"}]},
    ]


def validated(events: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Each event validated as the SDK's type, named by its `event:` line."""
    out = []
    for name, data in events:
        assert name == data["type"]
        if name == "ping":  # an upstream's keep-alive, passed through; the SDK skips it (no type)
            assert data == {"type": "ping"}
            continue
        out.append(ErrorResponse.model_validate(data) if name == "error" else EVENT.validate_python(data))
    return out


def test_create_against_the_local_target(gw: RunningGateway) -> None:
    raw = sdk(gw).messages.with_raw_response.create(
        model="auto", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-hybrid-route"] == "local" and raw.headers["x-request-id"]
    msg = Message.model_validate(json.loads(raw.http_response.text))
    assert msg.content[0].type == "text" and msg.content[0].text == "local answer"
    assert msg.stop_reason == "end_turn" and msg.usage.input_tokens == 5 and msg.usage.output_tokens == 7


def test_the_schema_check_is_strict() -> None:
    ok = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
          "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
    Message.model_validate(ok)
    for field in ("id", "content", "usage"):
        with pytest.raises(ValidationError):
            Message.model_validate({k: v for k, v in ok.items() if k != field})
    with pytest.raises(ValidationError):
        EVENT.validate_python({"type": "message_delta", "delta": {"stop_reason": "end_turn"}})  # no usage


def test_request_fields_reach_the_upstream_as_chat(gw: RunningGateway, cloud: ToolStreamingUpstream) -> None:
    sdk(gw).messages.create(
        model="auto", max_tokens=50, stop_sequences=["END"],
        extra_body={"temperature": 0.5, "top_p": 0.9},  # this SDK version has no parameters for them
        system=[{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two."}],
        metadata={"user_id": "u-7"}, tools=TOOLS, tool_choice={"type": "tool", "name": "send_mail"},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}],
        extra_headers={"x-route": "cloud"})
    got = cloud.received[-1]
    assert got["messages"][0] == {"role": "system", "content": "Rule one.\nRule two."}
    assert got["messages"][1]["content"][1] == {"type": "image_url",
                                                "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    assert got["max_tokens"] == 50 and got["temperature"] == 0.5 and got["top_p"] == 0.9
    assert got["stop"] == ["END"] and got["user"] == "u-7"
    assert got["tools"] == [{"type": "function", "function": {
        "name": "send_mail", "description": "Send an e-mail", "parameters": TOOLS[0]["input_schema"]}}]
    assert got["tool_choice"] == {"type": "function", "function": {"name": "send_mail"}}


def test_stream_events_in_order(gw: RunningGateway) -> None:
    events = validated(sse(gw, "/v1/messages", {
        "model": "auto", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "local answer"
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens > 0


def test_sdk_stream_helper(gw: RunningGateway) -> None:
    with sdk(gw).messages.stream(model="auto", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                                 extra_headers={"x-route": "cloud"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: hi" and final.content[0].text == text and final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 5 and final.usage.output_tokens > 0


def test_tool_history_with_pii_is_redacted_and_the_answer_restored(gw: RunningGateway,
                                                                   cloud: ToolStreamingUpstream) -> None:
    raw = sdk(gw).messages.with_raw_response.create(
        model="auto", max_tokens=64, system=f"Escalate to {EMAIL}.", tools=TOOLS, tool_choice={"type": "auto"},
        messages=history(), extra_headers=PRIVATE)
    msg = Message.model_validate(json.loads(raw.http_response.text))
    sent = json.dumps(cloud.received)
    assert EMAIL not in sent and CARD not in sent and "<EMAIL_ADDRESS_1>" in sent
    got = cloud.received[-1]["messages"]
    assert [m["role"] for m in got] == ["system", "user", "assistant", "tool", "user"]
    assert got[3]["tool_call_id"] == "toolu_1" and got[3]["content"] == "delivered to <EMAIL_ADDRESS_1>"
    assert json.loads(got[2]["tool_calls"][0]["function"]["arguments"])["to"] == "<EMAIL_ADDRESS_1>"
    assert int(raw.headers["x-hybrid-redactions"]) >= 2
    (call,) = msg.content
    assert call.type == "tool_use" and call.name == "send_mail" and call.id == "call_1"
    assert call.input == {"echo": f"Now confirm {EMAIL} got it"}  # restored, in the client's view
    assert msg.stop_reason == "tool_use"


def test_streamed_tool_call_arguments_are_restored(gw: RunningGateway, cloud: ToolStreamingUpstream) -> None:
    events = validated(sse(gw, "/v1/messages", {
        "model": "auto", "max_tokens": 64, "stream": True, "tools": TOOLS, "tool_choice": {"type": "any"},
        "messages": history()}, headers=PRIVATE))
    assert EMAIL not in json.dumps(cloud.received) and cloud.received[-1]["tool_choice"] == "required"
    start = next(e for e in events if e.type == "content_block_start")
    assert start.content_block.type == "tool_use" and start.content_block.name == "send_mail"
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert json.loads(partial) == {"echo": f"Now confirm {EMAIL} got it"}
    assert events[-2].delta.stop_reason == "tool_use" and events[-1].type == "message_stop"
    with sdk(gw).messages.stream(model="auto", max_tokens=64, tools=TOOLS, tool_choice={"type": "any"},
                                 messages=history(), extra_headers=PRIVATE) as stream:
        final = stream.get_final_message()
    assert final.content[0].input == {"echo": f"Now confirm {EMAIL} got it"}


@pytest.mark.parametrize("fault", [Fault("status", status=502), Fault("reset")], ids=lambda f: f.kind)
def test_cloud_dead_before_the_first_token_falls_back(gw: RunningGateway, cloud: ToolStreamingUpstream,
                                                      fault: Fault) -> None:
    cloud.fault = fault
    with sdk(gw).messages.stream(model="auto", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                                 extra_headers={"x-route": "cloud"}) as stream:
        assert stream.response.headers["x-hybrid-route"] == "local"
        text = "".join(stream.text_stream)
    assert text == "local answer"
    events = validated(sse(gw, "/v1/messages", {"model": "auto", "max_tokens": 64, "stream": True, "messages": [
        {"role": "user", "content": "hi"}]}, headers={"x-route": "cloud"}))
    assert [e.type for e in events].count("message_stop") == 1


def test_cloud_dying_mid_stream_is_continued_with_one_terminal_event(gw: RunningGateway,
                                                                     cloud: ToolStreamingUpstream) -> None:
    cloud.fault = Fault("truncated", after_chunks=3)
    events = validated(sse(gw, "/v1/messages", {"model": "auto", "max_tokens": 64, "stream": True, "messages": [
        {"role": "user", "content": "tell me something long"}]}, headers={"x-route": "cloud"}))
    kinds = [e.type for e in events]
    assert kinds.count("message_stop") == 1 and "error" not in kinds and kinds[-1] == "message_stop"
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "echo: tell m" + TAIL


def test_unrecoverable_mid_stream_break_ends_with_one_error_event(gw: RunningGateway,
                                                                  cloud: ToolStreamingUpstream) -> None:
    cloud.fault = Fault("truncated", after_chunks=2)
    events = validated(sse(gw, "/v1/messages", {"model": "auto", "max_tokens": 64, "stream": True, "messages": [
        {"role": "user", "content": "tell me something long"}]}, headers={"x-route": "cloud-only"}))
    kinds = [e.type for e in events]
    assert kinds[-1] == "error" and kinds.count("error") == 1 and "message_stop" not in kinds
    assert events[-1].error.type == "api_error" and "interrupted" in events[-1].error.message
    cloud.fault = Fault("truncated", after_chunks=2)
    got: list[str] = []
    with pytest.raises(anthropic.APIStatusError, match="interrupted"), sdk(gw).messages.stream(
            model="auto", max_tokens=64, messages=[{"role": "user", "content": "tell me something long"}],
            extra_headers={"x-route": "cloud-only"}) as stream:
        got.extend(stream.text_stream)
    assert "".join(got) == "echo: te"  # what arrived was delivered before the error


def test_missing_max_tokens_is_a_400_in_anthropics_shape(gw: RunningGateway) -> None:
    r = post(gw, "/v1/messages", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "Invalid request: max_tokens: Field required"},
                        "request_id": r.headers["x-request-id"]}


@pytest.mark.parametrize("body, where", [
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
     "messages.0.content.0"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"tool_choice": {"type": "tool"}, "tools": TOOLS}, "tool_choice.name"),
    ({"system": 5}, "system"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_types_are_400s_in_anthropics_shape(gw: RunningGateway, body: dict[str, Any], where: str) -> None:
    r = post(gw, "/v1/messages", {"model": "auto", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    err = ErrorResponse.model_validate(r.json())
    assert set(r.json()) == {"type", "error", "request_id"}
    assert err.error.type == "invalid_request_error" and where in err.error.message


def test_sdk_raises_its_typed_exceptions(gw: RunningGateway) -> None:
    args: dict[str, Any] = {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.AuthenticationError) as auth:
        sdk(gw, key="wrong").messages.create(model="auto", **args)
    assert auth.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "Invalid API key."},
                               "request_id": auth.value.response.headers["x-request-id"]}
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk(gw).messages.create(model="no-such-model", **args)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.PermissionDeniedError) as blocked:
        sdk(gw).messages.create(model="auto", extra_headers={"x-team": "blocked"}, **args)
    assert blocked.value.body["error"] == {"type": "permission_error", "message": "Team is not allowed."}
    with pytest.raises(anthropic.BadRequestError):
        sdk(gw).messages.create(model="auto", max_tokens=0, messages=[{"role": "user", "content": "hi"}])


def test_audit_lines_name_the_endpoint_and_early_errors_carry_a_request_id(gw: RunningGateway) -> None:
    ok = post(gw, "/v1/messages", {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
              headers={"x-request-id": "req-msg-ok"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-msg-ok"
    record = audit_line(gw, "req-msg-ok")
    assert record["endpoint"] == "/v1/messages" and record["target"] == "local" and record["status"] == 200
    bad = post(gw, "/v1/messages", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert bad.status_code == 400 and bad.headers["x-request-id"]
    record = audit_line(gw, bad.headers["x-request-id"])
    assert record["endpoint"] == "/v1/messages" and record["status"] == 400 and record["error"] == "invalid_value"
