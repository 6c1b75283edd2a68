"""gateway/assemble.py: a stream's chunks put back together as the chat completion a non-streamed
call returns, checked against the OpenAI SDK's own models and, end to end, against what the fake
upstream answers to the same request without streaming."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletion

from gateway.assemble import assemble, streaming_body
from tests.support.upstream import FakeUpstream

BASE = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1764806400, "model": "gpt-x-2026",
        "system_fingerprint": "fp_1"}


def chunk(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**BASE, "choices": list(choices), **extra}


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish, "logprobs": None}


def test_text_answer_with_usage() -> None:
    chunks = [
        chunk(delta(role="assistant", content=""), obfuscation="x1"),
        chunk(delta(content="Hel")),
        chunk(delta(content="lo!")),
        chunk(delta(finish="stop")),
        {**BASE, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    ]
    out = assemble(chunks)
    assert out == {
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1764806400, "model": "gpt-x-2026",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "Hello!", "refusal": None}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
    ChatCompletion.model_validate(out)


def test_parallel_tool_calls_are_merged_by_index() -> None:
    """OpenAI's wire format: the first delta of a call has its id and name, the rest only argument
    pieces; two calls interleave by index."""
    chunks = [
        chunk(delta(role="assistant", content=None)),
        chunk(delta(tool_calls=[{"index": 0, "id": "call_a", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}])),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}])),
        chunk(delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function",
                                 "function": {"name": "get_time", "arguments": '{"tz"'}}])),
        chunk(delta(tool_calls=[{"index": 0, "id": "call_a", "function": {"arguments": '"Paris"}'}}])),
        chunk(delta(tool_calls=[{"index": 1, "function": {"arguments": ': "CET"}'}}])),
        chunk(delta(finish="tool_calls")),
    ]
    out = assemble(chunks)
    msg = out["choices"][0]["message"]
    assert msg["content"] is None and out["choices"][0]["finish_reason"] == "tool_calls"
    assert msg["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
    ]
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [{"city": "Paris"}, {"tz": "CET"}]
    parsed = ChatCompletion.model_validate(out)
    assert parsed.choices[0].message.tool_calls is not None
    assert "usage" not in out  # none was sent: none is made up


def test_several_choices_logprobs_and_reasoning() -> None:
    lp = [{"token": "A", "logprob": -0.1, "bytes": [65], "top_logprobs": []}]
    chunks = [
        chunk(delta(0, role="assistant", content=""), delta(1, role="assistant", content="")),
        chunk({**delta(1, content="B"), "logprobs": {"content": lp[:1], "refusal": None}}),
        chunk({**delta(0, reasoning_content="think "), "logprobs": None}),
        chunk({**delta(0, reasoning_content="hard", content="A"), "logprobs": {"content": lp, "refusal": None}}),
        chunk({**delta(0, content="A"), "logprobs": {"content": lp, "refusal": None}}),
        chunk(delta(0, finish="length"), delta(1, finish="stop")),
    ]
    out = assemble(chunks)
    first, second = out["choices"]
    assert (first["index"], second["index"]) == (0, 1)
    assert first["message"]["content"] == "AA" and first["message"]["reasoning_content"] == "think hard"
    assert first["finish_reason"] == "length" and second["finish_reason"] == "stop"
    assert first["logprobs"] == {"content": lp + lp, "refusal": None}
    assert second["message"]["content"] == "B" and "reasoning_content" not in second["message"]
    ChatCompletion.model_validate(out)


def test_refusal_and_an_empty_answer() -> None:
    refused = assemble([chunk(delta(role="assistant", refusal="")), chunk(delta(refusal="I can't")),
                        chunk(delta(finish="stop"))])
    assert refused["choices"][0]["message"] == {"role": "assistant", "content": "", "refusal": "I can't"}
    # a stream cut right after the role chunk (no finish_reason) still gives a valid, empty answer
    empty = assemble([chunk(delta(role="assistant", content=""))])
    assert empty["choices"][0]["message"]["content"] == "" and empty["choices"][0]["finish_reason"] == "stop"
    ChatCompletion.model_validate(refused)
    ChatCompletion.model_validate(empty)


def test_streaming_body_asks_for_usage_and_keeps_the_rest() -> None:
    body = {"model": "m", "messages": [], "temperature": 0.2, "stream_options": {"include_obfuscation": False}}
    assert streaming_body(body) == {"model": "m", "messages": [], "temperature": 0.2, "stream": True,
                                    "stream_options": {"include_usage": True}}
    assert "stream" not in body  # the caller's body is not changed


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(model="cloud-model", name="cloud") as up:
        yield up


def test_same_shape_as_the_plain_answer(upstream: FakeUpstream) -> None:
    """The same request to a real HTTP upstream, plain and streamed: the assembled stream has the
    plain answer's fields and text."""
    body = {"model": "m", "messages": [{"role": "user", "content": "a fairly long question, chunked"}]}
    with httpx.Client(base_url=upstream.base_url, trust_env=False) as c:
        plain = c.post("/chat/completions", json=body).json()
        events = [json.loads(line[5:]) for line in c.post("/chat/completions", json=streaming_body(body)).text.splitlines()
                  if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    assert len(events) > 5
    out = assemble(events)
    assert set(out) == set(plain)
    assert out["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert out["model"] == plain["model"] and out["id"] == plain["id"]
    assert out["usage"]["completion_tokens"] == len(events) - 3  # role, finish and usage chunks aside
    ChatCompletion.model_validate(out)
