"""Both SDKs against the gateway with the built-in local model (the in-process engine) answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, Fault
from tests.support.wire_upstreams import MessagesUpstream

QUESTION = "What is the capital of France?"
POLICY = """
version: 1
targets:
  cloud: {{kind: cloud, model: openai/cloud-model, api_base: "{cloud}", api_key: sk-x, retries: 0}}
  claude: {{kind: cloud, model: anthropic/claude-test, api: messages, api_base: "{claude}", api_key: sk-x, retries: 0}}
  local: {{kind: local, engine: local_engine, model_path: "builtin:smollm2-135m", default_max_tokens: 24}}
connectivity: {{probe_interval_s: 30, failures_to_offline: 1000}}
privacy: {{enabled: false}}
difficulty: {{method: heuristic}}
rules:
  - {{name: cloud, when: {{header: {{x-route: cloud}}}}, route: cloud, fallback: [local]}}
  - {{name: claude, when: {{header: {{x-route: claude}}}}, route: claude, fallback: [local]}}
  - {{name: all, route: local}}
"""


@pytest.fixture(scope="module")
def cloud() -> Iterator[FakeUpstream]:
    with FakeUpstream(model="cloud-model", reply=lambda b: "The capital of France is Paris, of course.") as up:
        yield up


@pytest.fixture(scope="module")
def claude() -> Iterator[MessagesUpstream]:
    with MessagesUpstream(model="claude-test", reply=lambda b: "The capital of France is Paris, of course.") as up:
        yield up


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream,
       claude: MessagesUpstream) -> Iterator[RunningGateway]:
    path: Path = tmp_path_factory.mktemp("engine") / "p.yaml"
    path.write_text(POLICY.format(cloud=cloud.base_url, claude=claude.base_url))
    with run_gateway(path) as running:
        yield running


def test_anthropic_messages_on_the_engine(gw: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="x", max_retries=0, timeout=120)
    raw = client.messages.with_raw_response.create(model="auto", max_tokens=24, system="You are a helpful AI assistant.",
                                                   messages=[{"role": "user", "content": QUESTION}])
    msg = Message.model_validate(json.loads(raw.http_response.text))
    assert raw.headers["x-hybrid-route"] == "local"
    assert "Paris" in msg.content[0].text, msg.content
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 24
    events: list[Any] = []
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    with client.messages.stream(model="auto", max_tokens=24, system="You are a helpful AI assistant.",
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        for event in stream:
            events.append(event)
        final = stream.get_final_message()
    raw_events = [e for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                  "content_block_stop", "message_delta", "message_stop")]
    for e in raw_events:
        adapter.validate_python(e.model_dump())
    assert [e.type for e in raw_events][-2:] == ["message_delta", "message_stop"]
    assert final.content[0].text == msg.content[0].text  # greedy: the same answer both ways
    assert final.usage.output_tokens == msg.usage.output_tokens


def test_openai_responses_on_the_engine(gw: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    raw = client.responses.with_raw_response.create(model="auto", input=QUESTION, max_output_tokens=24)
    resp = Response.model_validate(json.loads(raw.http_response.text))
    assert "Paris" in resp.output_text and resp.status in ("completed", "incomplete")
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_python(e.model_dump()) for e in
              client.responses.create(model="auto", input=QUESTION, max_output_tokens=24, stream=True)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert last.response.output_text == resp.output_text and last.response.usage.output_tokens > 0


def test_a_broken_cloud_stream_is_finished_by_the_engine(gw: RunningGateway, cloud: FakeUpstream) -> None:
    """Messages stream: the cloud breaks after "The capital of F"; the engine writes the rest of
    the same sentence and the client sees one message with one message_stop."""
    cloud.fault = Fault("truncated", after_chunks=4)
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="x", max_retries=0, timeout=120)
    try:
        with client.messages.stream(model="auto", max_tokens=24, messages=[{"role": "user", "content": QUESTION}],
                                    extra_headers={"x-route": "cloud"}) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
    finally:
        cloud.fault = None
    text = final.content[0].text
    assert text.startswith("The capital of F") and len(text) > len("The capital of F") and "Paris" in text
    assert kinds.count("message_stop") == 1 and stream.response.headers["x-hybrid-route"] == "cloud"


def test_a_stop_sequence_and_the_input_count_on_the_engine(gw: RunningGateway) -> None:
    """message_start says the prompt's size in the engine's own tokens (what the answer's usage
    reports at the end), and a stop sequence that ended the answer is named, JSON and streamed."""
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="x", max_retries=0, timeout=120)
    ask: dict[str, Any] = {"model": "auto", "max_tokens": 24, "system": "You are a helpful AI assistant.",
                           "messages": [{"role": "user", "content": QUESTION}]}
    plain = client.messages.create(**ask)
    stop = "Paris"
    assert stop in plain.content[0].text, plain.content  # greedy: the answer says it, so it can stop there
    msg = client.messages.create(**ask, stop_sequences=["zzz-never", stop])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert plain.content[0].text.startswith(msg.content[0].text) and stop not in msg.content[0].text
    with client.messages.stream(**ask, stop_sequences=[stop]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    start = next(e for e in events if e.type == "message_start")
    assert start.message.usage.input_tokens == final.usage.input_tokens == plain.usage.input_tokens > 0
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop
    assert client.messages.create(**ask, stop_sequences=["zzz-never"]).stop_sequence is None


def test_a_broken_messages_target_stream_is_finished_by_the_engine(gw: RunningGateway, claude: MessagesUpstream) -> None:
    """An Anthropic Messages upstream dies after "The capital of F" (no message_stop); the engine
    writes the rest, and a Responses client sees one answer with one terminal event."""
    claude.fault = Fault("truncated", after_chunks=4, paths=("/messages",))
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        events = list(client.responses.create(model="auto", input=QUESTION, max_output_tokens=24, stream=True,
                                              extra_headers={"x-route": "claude"}))
    finally:
        claude.fault = None
    assert claude.received and "messages" in claude.received[0] and claude.received[0]["stream"] is True
    kinds = [e.type for e in events]
    assert kinds.count("response.completed") + kinds.count("response.incomplete") == 1
    assert "response.failed" not in kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.startswith("The capital of F") and len(text) > len("The capital of F") and "Paris" in text
