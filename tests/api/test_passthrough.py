"""Same-API pass-through: a Messages request to an `api: messages` target (a Responses request to an
`api: responses` target) arrives as the client's own body, model replaced and redacted in that
API's own positions, with everything chat has no place for kept (top_k, cache_control, thinking,
metadata, fields the gateway does not know); the upstream's own answer comes back, whole and
streamed, restored and valid against the published schemas. Also: tool ids a Messages upstream
would refuse are rewritten consistently, and message_start carries the upstream's input count.

Clients are the official SDKs (or raw SSE where every event is checked); upstreams are real HTTP
servers on loopback that record what they received.
"""

# The wire-target fixtures (gateway, upstreams) are imported from test_wire_targets: one setup, two modules.
# ruff: noqa: F811
from __future__ import annotations

import json
import re
from typing import Any

import pytest
from anthropic.types import Message
from openai.types.responses import Response

from gateway.privacy.native import MessagesEventRestorer, ResponsesEventRestorer
from gateway.privacy.vault import Vault
from gateway.wire import to_messages
from gateway.wire.anthropic_messages import MessagesStream
from gateway.wire.passthrough import NATIVE, PROMPT_TOKENS
from tests.api.conftest import CARD, EMAIL, TAIL, sse
from tests.api.test_messages_api import TOOLS as MESSAGES_TOOLS
from tests.api.test_messages_api import validated as messages_validated
from tests.api.test_published_schemas import valid
from tests.api.test_responses_api import validated as responses_validated
from tests.api.test_wire_targets import (  # noqa: F401 (fixtures)
    TO_MESSAGES,
    TO_RESPONSES,
    TOOL,
    _reset,
    claude,
    gw,
    leaked,
    messages_up,
    oai,
    responses_up,
)
from tests.support.gateway import RunningGateway
from tests.support.upstream import Fault
from tests.support.wire_upstreams import MessagesUpstream, ResponsesUpstream, messages_user_text

PLACEHOLDER = re.compile(r"<[A-Z_]+_\d+>")


def messages_body() -> dict[str, Any]:
    """Everything chat has no place for, and the planted values in every Messages position."""
    return {
        "model": "auto", "max_tokens": 64, "top_k": 5, "metadata": {"user_id": "u-42"},
        "thinking": {"type": "enabled", "budget_tokens": 1024}, "service_tier": "auto",
        "system": [{"type": "text", "text": f"The user is {EMAIL}.", "cache_control": {"type": "ephemeral"}}],
        "tools": MESSAGES_TOOLS, "tool_choice": {"type": "none"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Mail {EMAIL} my card {CARD}.",
                                          "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": f"They want a mail to {EMAIL}.", "signature": "sig-0"},
                {"type": "text", "text": "Sending it."},
                {"type": "tool_use", "id": "toolu_1", "name": "send_mail",
                 "input": {"to": EMAIL, "body": f"card {CARD}"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": f"delivered to {EMAIL}"}]},
                {"type": "text", "text": f"Now confirm {EMAIL} got it"}]},
        ],
    }


def _thinking(body: dict[str, Any]) -> str:
    return "thinking about " + messages_user_text(body)


def assert_messages_kept_and_redacted(got: dict[str, Any]) -> None:
    assert got["model"] == "cloud-model" and got["max_tokens"] == 64 and got["top_k"] == 5
    assert got["metadata"] == {"user_id": "u-42"} and got["service_tier"] == "auto"
    assert got["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert got["system"][0]["cache_control"] == {"type": "ephemeral"} and PLACEHOLDER.search(got["system"][0]["text"])
    first, assistant, last = got["messages"]
    assert first["content"][0]["cache_control"] == {"type": "ephemeral"}
    thinking, _, call = assistant["content"]
    assert thinking["type"] == "thinking" and thinking["signature"] == "sig-0" and PLACEHOLDER.search(thinking["thinking"])
    assert PLACEHOLDER.fullmatch(call["input"]["to"]) and PLACEHOLDER.search(call["input"]["body"])
    assert PLACEHOLDER.search(last["content"][0]["content"][0]["text"])
    assert got["tool_choice"] == {"type": "none"} and got["tools"][0]["input_schema"] == MESSAGES_TOOLS[0]["input_schema"]


def test_a_messages_request_is_passed_through_whole_and_redacted(
        gw: RunningGateway, messages_up: MessagesUpstream) -> None:
    messages_up.thinking = _thinking
    body = messages_body()
    raw = claude(gw).messages.with_raw_response.create(**{k: v for k, v in body.items() if k != "top_k"},
                                                         extra_body={"top_k": 5}, extra_headers=TO_MESSAGES)
    assert raw.headers["x-hybrid-route"] == "cloud" and int(raw.headers["x-hybrid-redactions"]) >= 2
    (got,) = messages_up.received
    assert not leaked(messages_up.received) and "stream" in got and got["stream"] is False
    assert_messages_kept_and_redacted(got)
    answer = json.loads(raw.http_response.text)
    valid("anthropic", "Message", answer)
    msg = Message.model_validate(answer)
    assert msg.id == "msg_test"  # the upstream's own answer, not a rebuilt one
    thinking, text = msg.content
    assert thinking.type == "thinking" and thinking.signature == "sig-1"
    assert thinking.thinking == f"thinking about Now confirm {EMAIL} got it"
    assert text.type == "text" and text.text == f"echo: Now confirm {EMAIL} got it"
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens) == (11, 2)


def test_a_messages_stream_is_passed_through_restored_and_valid(
        gw: RunningGateway, messages_up: MessagesUpstream) -> None:
    messages_up.thinking = _thinking
    events = sse(gw, "/v1/messages", {**messages_body(), "stream": True}, headers=TO_MESSAGES)
    for _, event in events:
        valid("anthropic", "MessageStreamEvent", event)
    assert ("ping", {"type": "ping"}) in events  # the upstream's own events, all of them
    typed = messages_validated(events)
    (got,) = messages_up.received
    assert not leaked(messages_up.received) and got["stream"] is True
    assert_messages_kept_and_redacted(got)
    kinds = [e.type for e in typed]
    assert kinds[0] == "message_start" and kinds.count("message_stop") == 1 and kinds[-1] == "message_stop"
    start = typed[0].message
    assert start.id == "msg_test" and start.usage.input_tokens == 11  # the upstream's own count
    deltas = [e for e in typed if e.type == "content_block_delta"]
    assert "".join(e.delta.thinking for e in deltas if e.delta.type == "thinking_delta") \
        == f"thinking about Now confirm {EMAIL} got it"
    assert [e.delta.signature for e in deltas if e.delta.type == "signature_delta"] == ["sig-1"]
    assert {e.index for e in deltas if e.delta.type == "text_delta"} == {1}
    assert "".join(e.delta.text for e in deltas if e.delta.type == "text_delta") == f"echo: Now confirm {EMAIL} got it"


def test_a_streamed_tool_use_passed_through_is_restored(gw: RunningGateway, messages_up: MessagesUpstream) -> None:
    messages_up.chunk_chars = 3  # placeholders cut across input_json deltas
    try:
        with claude(gw).messages.stream(model="auto", max_tokens=64, tools=MESSAGES_TOOLS, extra_body={"top_k": 3},
                                        messages=[{"role": "user", "content": f"mail {EMAIL}"}],
                                        extra_headers=TO_MESSAGES) as stream:
            final = stream.get_final_message()
    finally:
        messages_up.chunk_chars = 4
    assert not leaked(messages_up.received) and messages_up.received[0]["top_k"] == 3
    (block,) = final.content
    assert block.type == "tool_use" and block.input == {"echo": f"mail {EMAIL}"} and final.stop_reason == "tool_use"


def test_a_passed_through_stream_dying_mid_answer_is_finished_by_a_chat_target(
        gw: RunningGateway, messages_up: MessagesUpstream) -> None:
    messages_up.thinking = _thinking
    messages_up.fault = Fault("truncated", after_chunks=3, paths=("/messages",))
    events = sse(gw, "/v1/messages", {"model": "auto", "max_tokens": 64, "stream": True,
                                      "messages": [{"role": "user", "content": f"tell me more, {EMAIL}"}]},
                 headers=TO_MESSAGES)
    for _, event in events:
        valid("anthropic", "MessageStreamEvent", event)
    typed = messages_validated(events)
    kinds = [e.type for e in typed]
    assert kinds.count("message_stop") == 1 and kinds[-1] == "message_stop" and "error" not in kinds
    texts = [e for e in typed if e.type == "content_block_delta" and e.delta.type == "text_delta"]
    assert {e.index for e in texts} == {1}  # the continuation goes on in the upstream's open block
    assert "".join(e.delta.text for e in texts) == "echo: tell m" + TAIL
    starts = [e.index for e in typed if e.type == "content_block_start"]
    stops = [e.index for e in typed if e.type == "content_block_stop"]
    assert starts == stops == [0, 1]
    assert not leaked(messages_up.received)


def test_a_whole_answer_read_as_a_stream_is_still_the_upstreams_own(
        gw: RunningGateway, messages_up: MessagesUpstream) -> None:
    """A target with slowness limits is asked for a stream even for a JSON answer (its first token
    is timed): the answer is then made of the upstream's events, restored."""
    messages_up.thinking = _thinking
    messages_up.chunk_chars = 3
    try:
        raw = claude(gw).messages.with_raw_response.create(
            model="auto", max_tokens=64, tools=MESSAGES_TOOLS, extra_body={"top_k": 2},
            messages=[{"role": "user", "content": f"mail {EMAIL}"}], extra_headers={"x-route": "paced"})
    finally:
        messages_up.chunk_chars = 4
    (got,) = messages_up.received
    assert got["stream"] is True and got["top_k"] == 2 and not leaked(messages_up.received)
    answer = json.loads(raw.http_response.text)
    valid("anthropic", "Message", answer)
    msg = Message.model_validate(answer)
    assert msg.id == "msg_test" and raw.headers["x-hybrid-route"] == "cloud"
    thinking, call = msg.content
    assert thinking.type == "thinking" and thinking.thinking == f"thinking about mail {EMAIL}"
    assert thinking.signature == "sig-1"
    assert call.type == "tool_use" and call.input == {"echo": f"mail {EMAIL}"} and msg.stop_reason == "tool_use"


def test_a_whole_responses_answer_read_as_a_stream_is_still_the_upstreams_own(
        gw: RunningGateway, responses_up: ResponsesUpstream) -> None:
    responses_up.extra = {"service_tier": "default"}
    raw = oai(gw).responses.with_raw_response.create(model="auto", input=f"hi {EMAIL}", extra_body={"truncation": "auto"},
                                                     extra_headers={"x-route": "paced-responses"})
    (got,) = responses_up.received
    assert got["stream"] is True and got["truncation"] == "auto" and not leaked(responses_up.received)
    answer = json.loads(raw.http_response.text)
    valid("openai", "Response", answer)
    resp = Response.model_validate(answer)
    assert resp.id == "resp_test" and resp.service_tier == "default" and resp.output_text == f"echo: hi {EMAIL}"


def responses_body() -> dict[str, Any]:
    return {
        "model": "auto", "instructions": f"User: {EMAIL}", "max_output_tokens": 50, "store": False,
        "metadata": {"ticket": "7"}, "reasoning": {"effort": "low"}, "truncation": "auto",
        "prompt_cache_key": "k-1", "tools": [TOOL], "tool_choice": "none",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": f"Mail {EMAIL} my card"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": f"mail {EMAIL}"}],
             "encrypted_content": "opaque"},
            {"type": "function_call", "call_id": "call_9", "name": "send_mail", "arguments": json.dumps({"to": EMAIL})},
            {"type": "function_call_output", "call_id": "call_9", "output": f"sent to {EMAIL}, card {CARD}"},
            {"role": "user", "content": f"Did {EMAIL} get it?"},
        ],
    }


def assert_responses_kept_and_redacted(got: dict[str, Any]) -> None:
    assert got["model"] == "gpt-resp-test" and got["store"] is False and got["max_output_tokens"] == 50
    assert got["reasoning"] == {"effort": "low"} and got["truncation"] == "auto" and got["prompt_cache_key"] == "k-1"
    assert got["metadata"] == {"ticket": "7"} and PLACEHOLDER.search(got["instructions"])
    assert [i.get("type", "message") for i in got["input"]] == [
        "message", "reasoning", "function_call", "function_call_output", "message"]
    reasoning, call, output = got["input"][1:4]
    assert reasoning["encrypted_content"] == "opaque" and PLACEHOLDER.search(reasoning["summary"][0]["text"])
    assert PLACEHOLDER.fullmatch(json.loads(call["arguments"])["to"]) and PLACEHOLDER.search(output["output"])


def test_a_responses_request_is_passed_through_whole_and_redacted(
        gw: RunningGateway, responses_up: ResponsesUpstream) -> None:
    responses_up.extra = {"service_tier": "default"}
    body = {k: v for k, v in responses_body().items() if k != "model"}
    raw = oai(gw).responses.with_raw_response.create(model="auto", **body, extra_headers=TO_RESPONSES)
    (got,) = responses_up.received
    assert not leaked(responses_up.received)
    assert_responses_kept_and_redacted(got)
    answer = json.loads(raw.http_response.text)
    valid("openai", "Response", answer)
    resp = Response.model_validate(answer)
    assert resp.id == "resp_test" and resp.service_tier == "default"  # the upstream's own answer
    assert resp.output_text == f"echo: Did {EMAIL} get it?"
    assert resp.usage is not None and resp.usage.input_tokens == 11


def test_a_responses_stream_is_passed_through_restored_and_valid(
        gw: RunningGateway, responses_up: ResponsesUpstream) -> None:
    events = sse(gw, "/v1/responses", {**responses_body(), "stream": True}, headers=TO_RESPONSES)
    for _, event in events:
        valid("openai", "ResponseStreamEvent", event)
    typed = responses_validated(events)  # numbered 0.. in order, one terminal event
    (got,) = responses_up.received
    assert not leaked(responses_up.received) and got["stream"] is True
    assert_responses_kept_and_redacted(got)
    text = f"echo: Did {EMAIL} get it?"
    assert "".join(e.delta for e in typed if e.type == "response.output_text.delta") == text
    (done,) = [e for e in typed if e.type == "response.output_text.done"]
    assert done.text == text
    final = typed[-1]
    assert final.type == "response.completed" and final.response.id == "resp_test" and final.response.output_text == text


# -- tool ids a Messages upstream refuses ---------------------------------------------------------

ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]+")


def test_tool_ids_are_rewritten_for_a_messages_target_the_same_way_every_turn(
        gw: RunningGateway, messages_up: MessagesUpstream) -> None:
    history = [
        {"role": "user", "content": "mail the team"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "functions.send_mail:0", "type": "function", "function": {"name": "send_mail", "arguments": "{}"}},
            {"id": "functions.send_mail:1", "type": "function", "function": {"name": "send_mail", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "functions.send_mail:0", "content": "sent"},
        {"role": "tool", "tool_call_id": "functions.send_mail:1", "content": "sent"},
        {"role": "user", "content": "thanks"},
    ]
    for _ in range(2):
        oai(gw).chat.completions.create(model="auto", messages=history, extra_headers=TO_MESSAGES)  # type: ignore[arg-type]
    ids = []
    for got in messages_up.received:
        uses = [b["id"] for b in got["messages"][1]["content"] if b["type"] == "tool_use"]
        results = [b["tool_use_id"] for b in got["messages"][2]["content"] if b["type"] == "tool_result"]
        assert uses == results and len(set(uses)) == 2 and all(ANTHROPIC_ID.fullmatch(i) for i in uses)
        ids.append(uses)
    assert ids[0] == ids[1]  # the same conversation, the same ids
    # a Messages client's own ids, passed through, are rewritten alike
    claude(gw).messages.create(model="auto", max_tokens=16, extra_headers=TO_MESSAGES, messages=[
        {"role": "user", "content": "mail the team"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "functions.send_mail:0", "name": "send_mail",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.send_mail:0",
                                      "content": "sent"}]}])
    passed = messages_up.received[-1]["messages"]
    assert passed[1]["content"][0]["id"] == passed[2]["content"][0]["tool_use_id"] == ids[0][0]


def test_a_rewritten_tool_id_an_upstream_answers_with_is_mapped_back() -> None:
    safe = to_messages.tool_id("call.7")
    assert ANTHROPIC_ID.fullmatch(safe) and safe != to_messages.tool_id("call:7")
    ids = to_messages.tool_ids({"messages": [{"role": "assistant", "tool_calls": [{"id": "call.7"}]}]})
    message = {"type": "message", "model": "m", "stop_reason": "tool_use",
               "content": [{"type": "tool_use", "id": safe, "name": "f", "input": {}}]}
    assert to_messages.completion(message, "t", ids)["choices"][0]["message"]["tool_calls"][0]["id"] == "call.7"
    reader = to_messages.EventReader("t", ids=ids)
    reader.feed({"type": "message_start", "message": {"id": "m1", "model": "m", "usage": {"input_tokens": 3}}})
    (chunk,) = reader.feed({"type": "content_block_start", "index": 0,
                            "content_block": {"type": "tool_use", "id": safe, "name": "f", "input": {}}})
    assert chunk["choices"][0]["delta"]["tool_calls"][0]["id"] == "call.7"


# -- message_start's input count ------------------------------------------------------------------

def test_message_start_reports_an_anthropic_upstreams_own_count_when_translated() -> None:
    reader = to_messages.EventReader("t")
    (first,) = reader.feed({"type": "message_start", "message": {
        "id": "m1", "model": "m", "usage": {"input_tokens": 40, "cache_read_input_tokens": 2}}})
    assert first[PROMPT_TOKENS] == 42 and NATIVE not in first
    stream = MessagesStream("claude", input_tokens=7)  # 7: the gateway's estimate
    (start,) = stream.feed(first)
    assert start["type"] == "message_start" and start["message"]["usage"]["input_tokens"] == 42
    assert MessagesStream("claude", input_tokens=7).feed({"choices": []})[0]["message"]["usage"]["input_tokens"] == 7


# -- restoring events, however the upstream cut its deltas ---------------------------------------

def _vault() -> Vault:
    vault = Vault()
    vault.replacement_for("EMAIL_ADDRESS", EMAIL)
    return vault


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 100])
def test_event_restorers_release_the_same_text_for_any_cut(size: int) -> None:
    vault = _vault()
    redacted = vault.redact_text(f"write to {EMAIL} now")
    args = json.dumps({"to": vault.redact_text(EMAIL)})
    pieces = [redacted[i:i + size] for i in range(0, len(redacted), size)]
    m = MessagesEventRestorer(*vault.restorers())
    out = [e for p in pieces for e in m.feed({"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": p}})]
    out += m.feed({"type": "content_block_stop", "index": 0})
    assert "".join(e["delta"]["text"] for e in out if e["type"] == "content_block_delta") == f"write to {EMAIL} now"
    assert out[-1] == {"type": "content_block_stop", "index": 0}
    r = ResponsesEventRestorer(*vault.restorers())
    common = {"item_id": "fc_1", "output_index": 0}
    out = [e for i in range(0, len(args), size)
           for e in r.feed({"type": "response.function_call_arguments.delta", **common, "delta": args[i:i + size]})]
    out += r.feed({"type": "response.function_call_arguments.done", **common, "arguments": args})
    streamed = "".join(e["delta"] for e in out if e["type"].endswith(".delta"))
    assert json.loads(streamed) == json.loads(out[-1]["arguments"]) == {"to": EMAIL}
