"""Every chat answer validates strictly against OpenAI's `ChatCompletion` / `ChatCompletionChunk`,
whichever target wrote it: the engine, a cloud through litellm, a cloud over direct HTTP (here a
sloppy one: no usage, no logprobs, no refusal, a float `created`, a foreign finish reason)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, _Handler, _Server

# The `required` lists of OpenAI's published schema (openapi.yaml: CreateChatCompletionResponse,
# CreateChatCompletionStreamResponse and the objects they hold), vendored: pydantic's types default
# a missing optional field to None, so presence is checked here.
REQUIRED = {
    "completion": ("id", "choices", "created", "model", "object"),
    "choice": ("finish_reason", "index", "message", "logprobs"),
    "message": ("content", "refusal", "role"),
    "usage": ("prompt_tokens", "completion_tokens", "total_tokens"),
    "tool_call": ("id", "type", "function"),
    "function": ("name", "arguments"),
    "chunk": ("id", "choices", "created", "model", "object"),
    "chunk_choice": ("delta", "finish_reason", "index"),
}


def _has(obj: dict[str, Any], kind: str) -> None:
    missing = [k for k in REQUIRED[kind] if k not in obj]
    assert not missing, f"{kind} lacks {missing}: {obj}"


def strict_completion(data: dict[str, Any]) -> ChatCompletion:
    _has(data, "completion")
    for choice in data["choices"]:
        _has(choice, "choice")
        _has(choice["message"], "message")
        for call in choice["message"].get("tool_calls") or ():
            _has(call, "tool_call")
            _has(call["function"], "function")
    if data.get("usage") is not None:
        _has(data["usage"], "usage")
    assert data.get("system_fingerprint", "") is not None  # the published schema: a string, or absent
    return ChatCompletion.model_validate(data, strict=True)


def strict_chunk(data: dict[str, Any]) -> ChatCompletionChunk:
    _has(data, "chunk")
    for choice in data["choices"]:
        _has(choice, "chunk_choice")
    if data.get("usage") is not None:
        _has(data["usage"], "usage")
    return ChatCompletionChunk.model_validate(data, strict=True)


class _Sloppy(FakeUpstream):
    """Answers like a careless OpenAI-compatible server: no usage (streamed or not), no logprobs,
    no refusal, `created` as a float, `end_turn` for stop, and a field of its own."""

    def completion(self, body: dict[str, Any], reply: str) -> dict[str, Any]:
        out = super().completion(body, reply)
        del out["usage"], out["object"]
        out["created"] = float(out["created"])
        out["x_provider"] = {"cached": True}
        if out["choices"][0]["finish_reason"] == "stop":
            out["choices"][0]["finish_reason"] = "end_turn"
        return out

    def start(self) -> _Sloppy:
        self._server = _Server(("127.0.0.1", self.port), _NoUsageHandler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-sloppy")
        self._thread.start()
        return self


class _NoUsageHandler(_Handler):
    def _stream(self, body: dict[str, Any], reply: str, fault: Any) -> None:
        super()._stream({k: v for k, v in body.items() if k != "stream_options"}, reply, fault)


POLICY = """
version: 1
targets:
  direct: {{kind: cloud, model: openai/sloppy-model, api_base: "{sloppy}", api_key: sk-x, client: openai, retries: 0}}
  litellm: {{kind: cloud, model: openai/cloud-model, api_base: "{cloud}", api_key: sk-x, client: litellm, retries: 0}}
  engine: {{kind: local, engine: local_engine, model_path: "builtin:smollm2-135m", default_max_tokens: 6}}
connectivity: {{probe_interval_s: 30, failures_to_offline: 1000}}
privacy: {{enabled: false}}
difficulty: {{method: heuristic}}
rules:
  - {{name: direct, when: {{header: {{x-route: direct}}}}, route: direct, fallback: []}}
  - {{name: litellm, when: {{header: {{x-route: litellm}}}}, route: litellm, fallback: []}}
  - {{name: engine, route: engine}}
"""
TARGETS = ("direct", "litellm", "engine")


@pytest.fixture(scope="module")
def sloppy() -> Iterator[FakeUpstream]:
    with _Sloppy(model="sloppy-model", name="sloppy") as up:
        yield up


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, sloppy: FakeUpstream) -> Iterator[RunningGateway]:
    path: Path = tmp_path_factory.mktemp("chat-schema") / "p.yaml"
    path.write_text(POLICY.format(sloppy=sloppy.base_url, cloud=cloud.base_url))
    with run_gateway(path) as running:
        yield running


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": "Say hello to the team."}], **extra}


@pytest.mark.parametrize("target", TARGETS)
def test_completion_validates_strictly(gw: RunningGateway, target: str) -> None:
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json=_body(), headers={"x-route": target})
    assert r.status_code == 200, r.text
    data = r.json()
    parsed = strict_completion(data)
    assert r.headers["x-hybrid-route"] == target
    choice = data["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    assert parsed.usage is not None and parsed.usage.total_tokens > 0
    if target == "direct":  # the sloppy server's answer, rebuilt
        assert choice["finish_reason"] == "stop" and data["object"] == "chat.completion"
        assert isinstance(data["created"], int) and data["x_provider"] == {"cached": True}  # extras pass
        assert r.headers["x-hybrid-usage"] == "estimated"
        assert data["usage"]["completion_tokens"] == (len(choice["message"]["content"]) + 3) // 4
    else:
        assert r.headers["x-hybrid-usage"] == "reported"


def test_tool_call_completion_validates(gw: RunningGateway) -> None:
    tools = [{"type": "function", "function": {"name": "greet", "parameters": {"type": "object"}}}]
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0)
    for target in ("direct", "litellm"):
        raw = client.chat.completions.with_raw_response.create(
            **_body(tools=tools, tool_choice="auto"), extra_headers={"x-route": target})
        data = json.loads(raw.http_response.text)
        strict_completion(data)
        assert data["choices"][0]["finish_reason"] == "tool_calls"
        assert data["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "greet"


def _stream(gw: RunningGateway, target: str, **extra: Any) -> tuple[list[dict[str, Any]], httpx.Headers]:
    chunks: list[dict[str, Any]] = []
    with gw.client() as c, c.stream("POST", "/v1/chat/completions", json=_body(stream=True, **extra),
                                    headers={"x-route": target}) as r:
        assert r.status_code == 200, r.read()
        lines = list(r.iter_lines())
    data = [ln.removeprefix("data: ") for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    return chunks, r.headers


@pytest.mark.parametrize("target", TARGETS)
def test_stream_chunks_validate_and_usage_comes_last(gw: RunningGateway, target: str) -> None:
    chunks, _ = _stream(gw, target, stream_options={"include_usage": True})
    parsed = [strict_chunk(c) for c in chunks]
    assert len({c.id for c in parsed}) == 1 and len({c.created for c in parsed}) == 1
    assert all(ch["logprobs"] is None for c in chunks for ch in c["choices"])
    assert parsed[-1].choices == [] and parsed[-1].usage is not None and parsed[-1].usage.total_tokens > 0
    assert sum(c.usage is not None for c in parsed) == 1
    assert [ch.finish_reason for c in parsed for ch in c.choices if ch.finish_reason] in (["stop"], ["length"])
    # Without include_usage: no usage anywhere.
    chunks, _ = _stream(gw, target)
    assert all(strict_chunk(c).usage is None for c in chunks)


def test_stream_without_upstream_usage_gets_an_estimate_marked_as_such(gw: RunningGateway) -> None:
    with gw.client() as c, c.stream("POST", "/v1/chat/completions",
                                    json=_body(stream=True, stream_options={"include_usage": True}),
                                    headers={"x-route": "direct"}) as r:
        lines = list(r.iter_lines())
    assert ": x-hybrid-usage: estimated" in lines  # an SSE comment: clients skip it
    text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content") or ""
                   for ln in lines if ln.startswith("data: {") and json.loads(ln[6:])["choices"])
    last = json.loads([ln for ln in lines if ln.startswith("data: {")][-1][6:])
    assert last["usage"]["completion_tokens"] == (len(text) + 3) // 4 > 0
    # The SDK reads it like any usage chunk.
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0)
    sdk_chunks = list(client.chat.completions.create(**_body(stream=True, stream_options={"include_usage": True}),
                                                     extra_headers={"x-route": "direct"}))
    assert sdk_chunks[-1].usage is not None and sdk_chunks[-1].usage.prompt_tokens > 0
