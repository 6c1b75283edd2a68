"""Targets that speak another API (`api: messages`, `api: responses`): every incoming API reaches
them in their own wire format, redacted, and their answers (JSON and streams) come back in the
client's API, restored, with fallback and mid-stream resume to a chat target still working.

Clients are the official anthropic and openai SDKs; the upstreams are real HTTP servers on
loopback (tests/support/wire_upstreams.py) that record what they received.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import Message
from openai.types.responses import Response

from tests.api.conftest import CARD, EMAIL, KEY, TAIL, sse
from tests.api.test_messages_api import TOOLS as MESSAGES_TOOLS
from tests.api.test_messages_api import history as messages_history
from tests.api.test_messages_api import validated as messages_validated
from tests.api.test_responses_api import validated as responses_validated
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.policies import policy_yaml
from tests.support.tool_upstream import ToolStreamingUpstream
from tests.support.upstream import Fault
from tests.support.wire_upstreams import MessagesUpstream, ResponsesUpstream

POLICY = """
clients:
  - {name: app, api_key: key-one}
connectivity:
  probe_interval_s: 30
  failures_to_offline: 1000
limits:
  classify_budget_ms: 20000
privacy:
  nlp_model: none
difficulty:
  method: heuristic
rules:
  - name: to-messages
    when: { header: { x-route: messages } }
    route: cloud
    redact: true
    fallback: [local]
  - name: messages-only
    when: { header: { x-route: messages-only } }
    route: cloud
    redact: true
    fallback: []
  - name: paced
    when: { header: { x-route: paced } }
    route: cloud
    redact: true
    fallback: [responses, local]
    first_token_timeout_s: 10      # a whole answer is then read as a stream, to time its first token
  - name: paced-responses
    when: { header: { x-route: paced-responses } }
    route: responses
    redact: true
    fallback: [local]
    first_token_timeout_s: 10
  - name: to-responses
    when: { header: { x-route: responses } }
    route: responses
    redact: true
    fallback: [local]
  - name: default
    route: local
"""
TO_MESSAGES = {"x-route": "messages"}
TO_RESPONSES = {"x-route": "responses"}
TOOL = {"type": "function", "name": "send_mail", "description": "Send an e-mail",
        "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}


@pytest.fixture(scope="module")
def messages_up() -> Iterator[MessagesUpstream]:
    with MessagesUpstream(model="claude-test", name="messages") as up:
        yield up


@pytest.fixture(scope="module")
def responses_up() -> Iterator[ResponsesUpstream]:
    with ResponsesUpstream(model="gpt-resp-test", name="responses") as up:
        yield up


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, messages_up: MessagesUpstream, responses_up: ResponsesUpstream,
       local: ToolStreamingUpstream) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("wire-targets") / "policy.yaml"
    path.write_text(policy_yaml(
        messages_up.base_url, local.base_url,
        cloud={"timeout_s": 5, "retries": 0, "api": "messages"},
        local={"timeout_s": 5, "continues_answers": True},
        more_targets={"responses": {"kind": "cloud", "model": "openai/gpt-resp-test", "api": "responses",
                                    "api_base": responses_up.base_url, "api_key": "sk-test-resp",
                                    "timeout_s": 5, "retries": 0}},
        rest=POLICY))
    with run_gateway(path) as running:
        yield running


@pytest.fixture(autouse=True)
def _reset(messages_up: MessagesUpstream, responses_up: ResponsesUpstream) -> Iterator[None]:
    yield
    messages_up.reset()
    responses_up.reset()


def claude(gw: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)


def oai(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def leaked(received: list[dict[str, Any]]) -> bool:
    text = json.dumps(received)
    return EMAIL in text or CARD in text or CARD.replace(" ", "") in text


def test_a_messages_request_reaches_a_messages_target_as_messages_redacted(
        gw: RunningGateway, messages_up: MessagesUpstream) -> None:
    raw = claude(gw).messages.with_raw_response.create(
        model="auto", max_tokens=64, system=f"The user is {EMAIL}.", messages=messages_history(),
        tools=MESSAGES_TOOLS, tool_choice={"type": "none"}, extra_headers=TO_MESSAGES)
    assert raw.headers["x-hybrid-route"] == "cloud"
    msg = Message.model_validate(json.loads(raw.http_response.text))
    (got,) = messages_up.received
    assert not leaked(messages_up.received)
    assert got["max_tokens"] == 64 and got["system"].startswith("The user is ") and got["tool_choice"] == {"type": "none"}
    assert [m["role"] for m in got["messages"]] == ["user", "assistant", "user"]
    assert [b["type"] for b in got["messages"][1]["content"]] == ["text", "tool_use"]
    assert [b["type"] for b in got["messages"][2]["content"]] == ["tool_result", "text"]
    assert got["tools"][0]["input_schema"] == MESSAGES_TOOLS[0]["input_schema"]
    headers = {k.lower(): v for k, v in messages_up.received_headers[0].items()}
    assert headers["x-api-key"] == "sk-test-cloud" and headers["anthropic-version"] and "authorization" not in headers
    # the upstream echoed placeholders; the client gets its own values back
    assert msg.content[0].type == "text" and msg.content[0].text == f"echo: Now confirm {EMAIL} got it"
    # passed through: the upstream's own usage, its cache reads apart as Anthropic reports them
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (11, 2, 7)


def test_streamed_tool_use_from_a_messages_target_is_restored(gw: RunningGateway,
                                                               messages_up: MessagesUpstream) -> None:
    with claude(gw).messages.stream(model="auto", max_tokens=64, tools=MESSAGES_TOOLS,
                                    messages=[{"role": "user", "content": f"mail {EMAIL}"}],
                                    extra_headers=TO_MESSAGES) as stream:
        final = stream.get_final_message()
    assert not leaked(messages_up.received) and messages_up.received[0]["stream"] is True
    (block,) = final.content
    assert block.type == "tool_use" and block.input == {"echo": f"mail {EMAIL}"}
    assert final.stop_reason == "tool_use"


def test_a_responses_request_reaches_a_responses_target_as_responses_redacted(
        gw: RunningGateway, responses_up: ResponsesUpstream) -> None:
    history = [
        {"role": "user", "content": f"Mail {EMAIL} my card"},
        {"type": "function_call", "call_id": "call_9", "name": "send_mail", "arguments": json.dumps({"to": EMAIL})},
        {"type": "function_call_output", "call_id": "call_9", "output": f"sent to {EMAIL}, card {CARD}"},
        {"role": "user", "content": f"Did {EMAIL} get it?"},
    ]
    raw = oai(gw).responses.with_raw_response.create(model="auto", instructions=f"User: {EMAIL}", input=history,
                                                     tools=[TOOL], tool_choice="none", max_output_tokens=50,
                                                     extra_headers=TO_RESPONSES)
    assert raw.headers["x-hybrid-route"] == "responses"
    resp = Response.model_validate(json.loads(raw.http_response.text))
    (got,) = responses_up.received
    assert not leaked(responses_up.received)
    assert got["store"] is False and got["max_output_tokens"] == 50 and got["instructions"].startswith("User: ")
    # passed through as the client wrote it (its messages in the "easy" form, without a type)
    assert [i.get("type", "message") for i in got["input"]] == ["message", "function_call", "function_call_output",
                                                                "message"]
    assert got["tools"][0]["name"] == "send_mail" and got["tool_choice"] == "none"
    assert resp.output_text == f"echo: Did {EMAIL} get it?"
    assert resp.usage is not None and resp.usage.input_tokens == 11


def test_streamed_function_call_from_a_responses_target_is_restored(gw: RunningGateway,
                                                                    responses_up: ResponsesUpstream) -> None:
    events = responses_validated(sse(gw, "/v1/responses", {
        "model": "auto", "stream": True, "input": f"mail {EMAIL}", "tools": [TOOL], "tool_choice": "required"},
        headers=TO_RESPONSES))
    assert not leaked(responses_up.received)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"echo": f"mail {EMAIL}"}
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"echo": f"mail {EMAIL}"}  # the deltas restored too
    assert [e.type for e in events][-1] == "response.completed"


@pytest.mark.parametrize("route", ["messages", "responses"])
def test_any_api_to_any_target_api(gw: RunningGateway, messages_up: MessagesUpstream,
                                   responses_up: ResponsesUpstream, route: str) -> None:
    """Chat and the other API's clients are translated to the target's API, both ways."""
    up = messages_up if route == "messages" else responses_up
    chat = oai(gw).chat.completions.create(model="auto", messages=[{"role": "user", "content": f"hi {EMAIL}"}],
                                           extra_headers={"x-route": route})
    assert chat.choices[0].message.content == f"echo: hi {EMAIL}"
    msg = claude(gw).messages.create(model="auto", max_tokens=20, messages=[{"role": "user", "content": "yo"}],
                                     extra_headers={"x-route": route})
    assert msg.content[0].type == "text" and msg.content[0].text == "echo: yo"
    resp = oai(gw).responses.create(model="auto", input="hey", extra_headers={"x-route": route})
    assert resp.output_text == "echo: hey"
    assert not leaked(up.received) and len(up.received) == 3
    key = "messages" if route == "messages" else "input"
    assert all(key in body for body in up.received)


def test_a_messages_stream_dying_mid_answer_is_finished_by_the_next_target(gw: RunningGateway,
                                                                           messages_up: MessagesUpstream) -> None:
    messages_up.fault = Fault("truncated", after_chunks=3, paths=("/messages",))
    events = messages_validated(sse(gw, "/v1/messages", {"model": "auto", "max_tokens": 64, "stream": True,
                                                         "messages": [{"role": "user", "content": "tell me more"}]},
                                    headers=TO_MESSAGES))
    kinds = [e.type for e in events]
    assert kinds.count("message_stop") == 1 and "error" not in kinds and kinds[-1] == "message_stop"
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "echo: tell m" + TAIL


def test_a_responses_stream_dying_mid_answer_is_finished_by_the_next_target(gw: RunningGateway,
                                                                            responses_up: ResponsesUpstream) -> None:
    responses_up.fault = Fault("truncated", after_chunks=3, paths=("/responses",))
    events = responses_validated(sse(gw, "/v1/responses", {"model": "auto", "stream": True, "input": "tell me more"},
                                     headers=TO_RESPONSES))
    kinds = [e.type for e in events]
    assert kinds.count("response.completed") == 1 and "response.failed" not in kinds
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "echo: tell m" + TAIL


def test_a_dead_messages_target_falls_back_before_the_first_token(gw: RunningGateway,
                                                                  messages_up: MessagesUpstream) -> None:
    messages_up.fault = Fault("status", status=529, paths=("/messages",))
    with claude(gw).messages.stream(model="auto", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                                    extra_headers=TO_MESSAGES) as stream:
        assert stream.response.headers["x-hybrid-route"] == "local"
        assert "".join(stream.text_stream) == "local answer"


def test_an_unrecoverable_break_is_one_error_event(gw: RunningGateway, messages_up: MessagesUpstream) -> None:
    messages_up.fault = Fault("truncated", after_chunks=2, paths=("/messages",))
    events = messages_validated(sse(gw, "/v1/messages", {"model": "auto", "max_tokens": 64, "stream": True,
                                                         "messages": [{"role": "user", "content": "tell me more"}]},
                                    headers={"x-route": "messages-only"}))
    kinds = [e.type for e in events]
    assert kinds[-1] == "error" and kinds.count("error") == 1 and "message_stop" not in kinds


BAD_API = """version: 1
targets:
  local: {kind: local, engine: local_engine, model_path: builtin:smollm2-135m}
  claude:
    kind: cloud
    model: anthropic/claude-x
    api_base: http://127.0.0.1:9/v1
    api: {api}
rules:
  - {name: default, route: local}
"""


@pytest.mark.parametrize(("api", "line", "says"), [
    ("anthropic", 8, "Input should be 'chat', 'responses' or 'messages'"),
    ("messages\n    client: litellm", 4, "`client: litellm` speaks chat only"),
])
def test_policy_check_names_the_line_of_a_bad_api(api: str, line: int, says: str) -> None:
    from gateway.policy.load import PolicyError, parse_policy

    with pytest.raises(PolicyError) as err:
        parse_policy(BAD_API.replace("{api}", api), file="p.yaml")
    assert f"p.yaml:{line}:" in str(err.value) and says in str(err.value)


def test_explain_names_the_wire_format_of_each_target(gw: RunningGateway) -> None:
    with gw.client() as c:
        r = c.post("/v1/route/explain", headers={"x-api-key": KEY, **TO_MESSAGES},
                   json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["wire"] == {"cloud": "messages", "local": "chat"}


def test_a_stop_sequence_of_a_messages_target_is_reported(gw: RunningGateway) -> None:
    ask: dict[str, Any] = {"model": "auto", "max_tokens": 64, "stop_sequences": ["never", "STOP"],
                           "messages": [{"role": "user", "content": "say hi STOP and more"}],
                           "extra_headers": TO_MESSAGES}
    msg = claude(gw).messages.create(**ask)
    assert (msg.content[0].type, msg.stop_reason, msg.stop_sequence) == ("text", "stop_sequence", "STOP")
    assert msg.content[0].text == "echo: say hi "
    with claude(gw).messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "STOP")
    plain = claude(gw).messages.create(**{**ask, "stop_sequences": ["never"]})
    assert (plain.stop_reason, plain.stop_sequence) == ("end_turn", None)
