"""Every answer object and stream event the gateway emits validates against the PUBLISHED OpenAI and
Anthropic OpenAPI schemas (fragments vendored in tests/api/schemas/, see PROVENANCE.md), with
jsonschema, whichever target answered: the in-process engine, a careless chat upstream, an
Anthropic Messages upstream and a Responses upstream; JSON and streamed, text and tool calls,
and the errors of each API, a stream that broke for good included.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from tests.api.test_chat_schema import _Sloppy
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, Fault
from tests.support.wire_upstreams import MessagesUpstream, ResponsesUpstream

SCHEMAS = Path(__file__).parent / "schemas"
POLICY = """
version: 1
targets:
  sloppy: {{kind: cloud, model: openai/sloppy-model, api_base: "{sloppy}", api_key: sk-x, client: openai, retries: 0}}
  claude: {{kind: cloud, model: anthropic/claude-test, api: messages, api_base: "{messages}", api_key: sk-x, retries: 0}}
  resp: {{kind: cloud, model: openai/resp-test, api: responses, api_base: "{responses}", api_key: sk-x, retries: 0}}
  engine: {{kind: local, engine: local_engine, model_path: "builtin:smollm2-135m", default_max_tokens: 8}}
connectivity: {{probe_interval_s: 30, failures_to_offline: 1000}}
privacy: {{enabled: false}}
difficulty: {{method: heuristic}}
rules:
  - {{name: sloppy, when: {{header: {{x-route: sloppy}}}}, route: sloppy, fallback: []}}
  - {{name: claude, when: {{header: {{x-route: claude}}}}, route: claude, fallback: []}}
  - {{name: resp, when: {{header: {{x-route: resp}}}}, route: resp, fallback: []}}
  - {{name: engine, route: engine}}
"""
TARGETS = ("sloppy", "claude", "resp", "engine")
TOOLS_CHAT = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]
TOOLS_MESSAGES = [{"name": "lookup", "input_schema": TOOLS_CHAT[0]["function"]["parameters"]}]
TOOLS_RESPONSES = [{"type": "function", "name": "lookup", "parameters": TOOLS_CHAT[0]["function"]["parameters"]}]


def _nullable(check: Any) -> Any:
    """OpenAI's document says `openapi: 3.1.0` but still marks a few fields with 3.0's
    `nullable: true` (chunk `finish_reason`, `logprobs`), which JSON Schema ignores: honour it."""
    def keyword(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
        if instance is None and schema.get("nullable") is True:
            return
        yield from check(validator, value, instance, schema)
    return keyword


OpenAPIValidator = validators.extend(Draft202012Validator, {
    "type": _nullable(Draft202012Validator.VALIDATORS["type"]),
    "enum": _nullable(Draft202012Validator.VALIDATORS["enum"])})


@functools.cache
def validator(api: str, name: str) -> Any:
    document = json.loads((SCHEMAS / f"{api}.json").read_text())
    return OpenAPIValidator({**document, "$ref": f"#/components/schemas/{name}"})


def valid(api: str, name: str, obj: Any) -> None:
    errors = sorted(validator(api, name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5])


@pytest.fixture(scope="module")
def ups() -> Iterator[dict[str, FakeUpstream]]:
    with _Sloppy(model="sloppy-model", name="sloppy") as sloppy, \
            MessagesUpstream(model="claude-test", name="claude") as messages, \
            ResponsesUpstream(model="resp-test", name="resp") as responses:
        yield {"sloppy": sloppy, "claude": messages, "resp": responses}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, FakeUpstream]) -> Iterator[RunningGateway]:
    path: Path = tmp_path_factory.mktemp("published") / "p.yaml"
    path.write_text(POLICY.format(sloppy=ups["sloppy"].base_url, messages=ups["claude"].base_url,
                                  responses=ups["resp"].base_url))
    with run_gateway(path) as running:
        yield running


def call(gw: RunningGateway, path: str, body: dict[str, Any], target: str) -> httpx.Response:
    with httpx.Client(base_url=gw.base_url, timeout=120, trust_env=False) as c:
        return c.post(path, json=body, headers={"x-route": target})


def events(gw: RunningGateway, path: str, body: dict[str, Any], target: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name or "", data) of a streamed answer; chat's `[DONE]` left out."""
    out: list[tuple[str, dict[str, Any]]] = []
    name = ""
    with httpx.Client(base_url=gw.base_url, timeout=120, trust_env=False) as c, c.stream("POST", path, json=body, headers={"x-route": target}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and line != "data: [DONE]":
                out.append((name, json.loads(line.removeprefix("data: "))))
    assert out
    return out


def asks(tools: bool) -> dict[str, dict[str, Any]]:
    text = "look up the weather"
    chat: dict[str, Any] = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    messages: dict[str, Any] = {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
    responses: dict[str, Any] = {"model": "auto", "input": text, "max_output_tokens": 16}
    if tools:  # room for the engine's whole call
        chat.update(tools=TOOLS_CHAT, tool_choice="required", max_tokens=48)
        messages.update(tools=TOOLS_MESSAGES, tool_choice={"type": "any"}, max_tokens=48)
        responses.update(tools=TOOLS_RESPONSES, tool_choice="required", max_output_tokens=48)
    return {"chat": chat, "messages": messages, "responses": responses}


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
@pytest.mark.parametrize("target", TARGETS)
def test_answers_validate(gw: RunningGateway, target: str, tools: bool) -> None:
    ask = asks(tools)
    r = call(gw, "/v1/chat/completions", ask["chat"], target)
    assert r.status_code == 200, r.text
    valid("openai", "CreateChatCompletionResponse", r.json())
    r = call(gw, "/v1/messages", ask["messages"], target)
    assert r.status_code == 200, r.text
    valid("anthropic", "Message", r.json())
    assert (r.json()["content"][-1]["type"] == "tool_use") is tools
    r = call(gw, "/v1/responses", ask["responses"], target)
    assert r.status_code == 200, r.text
    valid("openai", "Response", r.json())
    assert any(item["type"] == "function_call" for item in r.json()["output"]) is tools


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
@pytest.mark.parametrize("target", TARGETS)
def test_stream_events_validate(gw: RunningGateway, target: str, tools: bool) -> None:
    ask = asks(tools)
    chunks = events(gw, "/v1/chat/completions", {**ask["chat"], "stream": True,
                                                   "stream_options": {"include_usage": True}}, target)
    for _, chunk in chunks:
        valid("openai", "CreateChatCompletionStreamResponse", chunk)
    messages = events(gw, "/v1/messages", {**ask["messages"], "stream": True}, target)
    for name, event in messages:
        assert name == event["type"]
        valid("anthropic", "MessageStreamEvent", event)
    assert messages[-1][1]["type"] == "message_stop"
    responses = events(gw, "/v1/responses", {**ask["responses"], "stream": True}, target)
    for name, event in responses:
        assert name == event["type"]
        valid("openai", "ResponseStreamEvent", event)
    assert responses[-1][1]["type"] in ("response.completed", "response.incomplete")


def test_errors_validate(gw: RunningGateway) -> None:
    r = call(gw, "/v1/messages", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}, "engine")
    assert r.status_code == 400
    valid("anthropic", "ErrorResponse", r.json())
    r = call(gw, "/v1/responses", {"model": "auto", "input": 3}, "engine")
    assert r.status_code == 400
    valid("openai", "ErrorResponse", r.json())
    r = call(gw, "/v1/chat/completions", {"model": "auto", "messages": "hi"}, "engine")
    assert r.status_code == 400
    valid("openai", "ErrorResponse", r.json())


def test_a_stream_broken_for_good_ends_with_a_valid_terminal_event(gw: RunningGateway,
                                                                   ups: dict[str, FakeUpstream]) -> None:
    ask = asks(False)
    ups["claude"].fault = Fault("truncated", after_chunks=2, paths=("/messages",))
    try:
        messages = events(gw, "/v1/messages", {**ask["messages"], "stream": True}, "claude")
        responses = events(gw, "/v1/responses", {**ask["responses"], "stream": True}, "claude")
    finally:
        ups["claude"].fault = None
    assert messages[-1][1]["type"] == "error"
    for _, event in messages[:-1]:
        valid("anthropic", "MessageStreamEvent", event)
    valid("anthropic", "ErrorResponse", messages[-1][1])
    assert responses[-1][1]["type"] == "response.failed"
    for _, event in responses:
        valid("openai", "ResponseStreamEvent", event)


def test_embeddings_validate(gw: RunningGateway) -> None:
    r = call(gw, "/v1/embeddings", {"model": "auto", "input": ["one", "two"], "encoding_format": "float"}, "engine")
    assert r.status_code == 200, r.text
    valid("openai", "CreateEmbeddingResponse", r.json())
