"""The OpenAI API surface through a real server, with the official SDK and raw httpx."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.support.gateway import RunningGateway
from tests.support.upstream import FakeUpstream, Fault


def sdk(gw: RunningGateway, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0, **kw)


def test_sdk_non_streaming_default_rule_goes_local(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream):
    raw = sdk(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], temperature=0.2, max_tokens=20,
        stop=["\n\n"], seed=7, user="u1", metadata={"k": "v"},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "local answer"
    assert raw.headers["x-hybrid-route"] == "local"
    assert raw.headers["x-hybrid-rule"] == "default"
    assert raw.headers["x-hybrid-connectivity"] == "online"
    assert raw.headers["x-hybrid-sensitivity"] in ("none", "low", "medium", "high")
    assert raw.headers["x-hybrid-difficulty"] == "unscored"  # no rule of this policy reads difficulty
    assert raw.headers["x-hybrid-redactions"] == "0"
    assert "x-hybrid-fallback" not in raw.headers
    assert completion.usage is not None and completion.usage.total_tokens == 12
    sent = local.received[-1]
    assert sent["model"] == "local-model"  # the target's model, not the alias the client used
    for key, value in {"temperature": 0.2, "max_tokens": 20, "stop": ["\n\n"], "seed": 7, "user": "u1"}.items():
        assert sent[key] == value
    assert cloud.received == []


def test_sdk_streaming_through_cloud_rule(gw: RunningGateway, cloud: FakeUpstream):
    client = sdk(gw)
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "stream me please"}], stream=True,
        extra_headers={"x-route": "cloud"}, stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers["x-hybrid-route"] == "cloud"
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert cloud.received[-1]["stream"] is True


def test_stream_without_usage_request_has_no_empty_choices_chunk(gw: RunningGateway):
    # Unmodified apps index chunk.choices[0]: a usage-only chunk they did not ask for would break them.
    chunks = list(sdk(gw).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "x"}], stream=True, extra_headers={"x-route": "cloud"}
    ))
    assert all(c.choices for c in chunks)


async def test_async_sdk_concurrent(gw: RunningGateway):
    client = openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0)
    results = await asyncio.gather(*[
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": f"q{i}"}],
                                       extra_headers={"x-route": "cloud"})
        for i in range(12)
    ])
    assert sorted(r.choices[0].message.content for r in results) == sorted(f"echo: q{i}" for i in range(12))
    await client.close()


def test_tools_and_response_format_pass_through(gw: RunningGateway, cloud: FakeUpstream):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    raw = sdk(gw).chat.completions.with_raw_response.create(
        model="auto", messages=history, tools=tools, tool_choice="auto",
        response_format={"type": "json_object"},
    )
    completion = raw.parse()
    assert raw.headers["x-hybrid-rule"] == "tools-cloud"
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"echo": "and tomorrow?"}
    sent = cloud.received[-1]
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_models_lists_targets_aliases_and_auto(gw: RunningGateway):
    ids = [m.id for m in sdk(gw).models.list()]
    assert {"auto", "cloud", "local", "smart", "gpt-4o"} <= set(ids)


def test_alias_pins_target(gw: RunningGateway, cloud: FakeUpstream):
    raw = sdk(gw).chat.completions.with_raw_response.create(model="smart", messages=[{"role": "user", "content": "a"}])
    assert raw.headers["x-hybrid-route"] == "cloud"
    assert cloud.received[-1]["model"] == "cloud-model"


def test_explain_returns_decision_without_calling_models(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream):
    with gw.client() as c:
        r = c.post("/v1/route/explain", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}],
                                              "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 200
    body = r.json()
    assert body["decision"]["rule"] == "tools-cloud"
    assert body["decision"]["target"] == "cloud"
    assert body["decision"]["fallbacks"] == ["local"]
    assert body["features"]["has_tools"] is True
    # explain scores difficulty even though no rule reads it (to help write one)
    assert body["features"]["difficulty"]["level"] in ("easy", "medium", "hard")
    assert body["features"]["difficulty"]["method"] != "skipped"
    assert cloud.received == [] and local.received == []


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"\xff\xfe\xfa", {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, "invalid_json"),
        (b"", {}, 400, "invalid_json"),
        (b"[" * 5000 + b"]" * 5000, {}, 400, "invalid_json"),
        (json.dumps({"model": "auto"}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"model": "auto", "messages": []}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"model": 5, "messages": [{"role": "user", "content": "x"}]}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), {}, 404, "model_not_found"),
        (json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x" * 30000}]}).encode(), {}, 413, "body_too_large"),
        (json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}]}).encode(), {"x-team": "blocked-1"}, 403, "blocked_by_policy"),
    ],
)
def test_errors_have_openai_shape(gw: RunningGateway, content: bytes, headers: dict, status: int, code: str):
    with gw.client() as c:
        r = c.post("/v1/chat/completions", content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    assert "Traceback" not in r.text


def test_sdk_raises_typed_errors(gw: RunningGateway):
    client = sdk(gw)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"x-team": "blocked-9"})
    assert "Team is not allowed" in str(exc.value)


def test_unknown_path_and_method(gw: RunningGateway):
    with gw.client() as c:
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()


def test_health_ready_metrics(gw: RunningGateway):
    with gw.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["targets"]["local"] == "ready"
        c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "m"}]})
        text = c.get("/metrics").text
    assert 'hybrid_requests_total{endpoint="/v1/chat/completions",route="local",rule="default",status="200"}' in text
    assert "hybrid_request_duration_seconds_bucket" in text
    assert 'hybrid_target_online{target="cloud"} 1.0' in text


def test_admin_requires_key(gw: RunningGateway):
    with gw.client() as c:
        r = c.post("/admin/connectivity", json={"target": "cloud", "force": "offline"})
        assert r.status_code == 401
        r = c.post("/admin/connectivity", json={"target": "nope", "force": "offline"},
                   headers={"authorization": "Bearer admin-secret"})
        assert r.status_code == 404


def test_all_targets_down_is_503_with_retry_after(gw: RunningGateway, cloud: FakeUpstream):
    # `long-cloud` has no fallback: when the cloud fails, nothing else may serve it.
    cloud.fault = Fault("status", status=502)
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "w " * 500}]})
    assert r.status_code == 503, (r.headers, r.text[:300])
    assert r.headers["retry-after"].isdigit()
    assert r.json()["error"]["code"] == "all_targets_unavailable"
    cloud.fault = None


def test_slow_body_is_cut_off(gw: RunningGateway):
    # A client that declares a body and never sends it must not hold a worker forever.
    import socket
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\"")
    s.settimeout(20)
    data = s.recv(4096)
    s.close()
    assert b"408" in data.split(b"\r\n")[0]


def test_raw_httpx_keepalive_many_requests(gw: RunningGateway):
    with httpx.Client(base_url=gw.base_url, trust_env=False) as c:
        for i in range(30):
            r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": str(i)}]})
            assert r.status_code == 200


def test_unexpected_error_is_an_openai_500_without_details(gw: RunningGateway, monkeypatch: pytest.MonkeyPatch):
    from gateway import pipeline

    async def broken(*args, **kwargs):
        raise RuntimeError("secret prompt text must not leak")

    monkeypatch.setattr(pipeline, "prepare", broken)
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "Internal error in the gateway.", "type": "server_error",
                                      "param": None, "code": "internal_error"}}
        assert "secret" not in r.text
        # the next request is served normally
        monkeypatch.undo()
        assert c.post("/v1/chat/completions",
                      json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200


def test_streams_reuse_the_upstream_connection(gw: RunningGateway, cloud: FakeUpstream):
    assert cloud._server is not None
    with gw.client() as c:
        ask = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        c.post("/v1/chat/completions", headers={"x-route": "cloud"}, json=ask).read()
        before = cloud._server.accepted
        for _ in range(20):
            r = c.post("/v1/chat/completions", headers={"x-route": "cloud"}, json=ask)
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    # the stream's body is read to its end, so the pooled connection is reused, not dropped
    assert cloud._server.accepted - before <= 1


def _served_by_default_rule(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('hybrid_requests_total{endpoint="/v1/chat/completions",route="local",rule="default",status="200"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_leaves_mid_stream_ends_the_request_at_once(gw: RunningGateway, local: FakeUpstream):
    # The upstream stalls for 6 s after two chunks; the client reads one and hangs up. The gateway
    # must notice the hang-up while it waits on the stalled upstream (not when the stall ends or
    # the target's 5 s timeout fires): the request is closed and recorded right away.
    local.fault = Fault("stall_mid", seconds=6, after_chunks=2)
    with gw.client() as c:
        before = _served_by_default_rule(c)
        with httpx.Client(base_url=gw.base_url, timeout=10, trust_env=False) as s, s.stream(
            "POST", "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "a long answer"}], "stream": True},
        ) as r:
            assert r.status_code == 200
            next(r.iter_raw())
        left = time.monotonic()
        while _served_by_default_rule(c) == before and time.monotonic() - left < 4:
            time.sleep(0.05)
        assert _served_by_default_rule(c) == before + 1
        assert time.monotonic() - left < 2
