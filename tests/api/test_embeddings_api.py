"""POST /v1/embeddings with the official openai SDK: the device's MiniLM and a fake cloud on loopback."""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from gateway.backends.local_embeddings import MAX_TOKENS
from gateway.classify.difficulty.embed import shared_embedder
from tests.api.conftest import EMAIL, KEY, audit_line, post
from tests.support.embeddings_upstream import EmbeddingsUpstream, vector_for
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import Fault

CLOUD_SPACE = "text-embedding-3-small"
POLICY = f"""
version: 1
targets:
  cloud:
    kind: cloud
    model: openai/cloud-model
    api_base: "CLOUD_URL"
    api_key: sk-test-cloud
    retries: 0
    timeout_s: 5
    embeddings: {{model: openai/{CLOUD_SPACE}, dimensions: 8, shortens: true}}
  cloud-lite:  # the same upstream and space, through litellm's aembedding
    kind: cloud
    model: openai/cloud-model
    api_base: "CLOUD_URL"
    api_key: sk-test-cloud
    client: litellm
    retries: 0
    timeout_s: 5
    embeddings: {{model: openai/{CLOUD_SPACE}, dimensions: 8, shortens: true}}
  engine: {{kind: local, engine: local_engine, model_path: "builtin:smollm2-135m"}}
clients:
  - {{name: app, api_key: {KEY}}}
connectivity: {{probe_interval_s: 30, failures_to_offline: 1000}}
limits: {{classify_budget_ms: 20000}}
privacy: {{nlp_model: none}}
difficulty: {{method: heuristic}}
rules:
  - name: blocked
    when: {{header: {{x-team: blocked}}}}
    block: {{status: 403, message: "Team is not allowed."}}
  - name: private
    when: {{header: {{x-route: private}}}}
    route: cloud
    redact: true
    fallback: [engine]
  - name: private-any-space
    when: {{header: {{x-route: private-any-space}}}}
    route: cloud
    redact: true
    fallback: [engine]
    allow_space_change: true
  - name: to-cloud
    when: {{header: {{x-route: cloud}}}}
    route: cloud
    fallback: [engine]
  - name: same-space
    when: {{header: {{x-route: same-space}}}}
    route: cloud
    fallback: [cloud-lite, engine]
  - name: cloud-any-space
    when: {{header: {{x-route: cloud-any-space}}}}
    route: cloud
    fallback: [engine]
    allow_space_change: true
  - name: default
    route: engine
"""

SENTENCES = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "The quarterly tax filing deadline is near."]


@pytest.fixture(scope="module")
def cloud() -> Iterator[EmbeddingsUpstream]:
    with EmbeddingsUpstream(model=CLOUD_SPACE, name="cloud") as up:
        yield up


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: EmbeddingsUpstream) -> Iterator[RunningGateway]:
    path: Path = tmp_path_factory.mktemp("embeddings") / "policy.yaml"
    path.write_text(POLICY.replace("CLOUD_URL", cloud.base_url))
    with run_gateway(path, audit_path=str(path.parent / "audit.jsonl")) as running:
        yield running


def sdk(gw: RunningGateway, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60,
                         default_headers=headers)


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_local_minilm_answers_the_sdk_with_the_real_model(gw: RunningGateway, cloud: EmbeddingsUpstream) -> None:
    raw = sdk(gw).embeddings.with_raw_response.create(model="all-minilm-l6-v2", input=SENTENCES,
                                                      encoding_format="float")
    CreateEmbeddingResponse.model_validate_json(raw.http_response.text, strict=True)
    res = raw.parse()
    assert raw.headers["x-hybrid-route"] == "engine"
    assert raw.headers["x-hybrid-embedding-space"] == "all-minilm-l6-v2"
    assert raw.headers["x-hybrid-usage"] == "reported"
    assert res.model == "all-minilm-l6-v2" and [d.index for d in res.data] == [0, 1, 2]
    vectors = [d.embedding for d in res.data]
    assert all(len(v) == 384 and math.isclose(float(np.linalg.norm(v)), 1.0, abs_tol=1e-4) for v in vectors)
    assert _cos(vectors[0], vectors[1]) > _cos(vectors[0], vectors[2]) + 0.2  # a model, not noise
    expected = shared_embedder(max_tokens=MAX_TOKENS, kind="minilm").embed_many(SENTENCES)
    assert np.allclose(np.array(vectors), expected, atol=1e-6)
    assert res.usage.prompt_tokens == res.usage.total_tokens > len(SENTENCES) * 2
    assert cloud.received == []
    record = audit_line(gw, raw.headers["x-request-id"])
    assert record["endpoint"] == "/v1/embeddings" and record["target"] == "engine" and record["status"] == 200
    with gw.client() as c:
        metrics = c.get("/metrics").text
    assert 'hybrid_requests_total{endpoint="/v1/embeddings",route="engine",rule="default",status="200"}' in metrics


def test_base64_decodes_to_the_float_vector(gw: RunningGateway) -> None:
    client = sdk(gw)
    floats = client.embeddings.create(model="auto", input="Where is the nearest train station?",
                                      encoding_format="float").data[0].embedding
    # The SDK asks for base64 when encoding_format is not given, and decodes it itself.
    decoded = client.embeddings.create(model="auto", input="Where is the nearest train station?").data[0].embedding
    assert decoded == floats
    wire = post(gw, "/v1/embeddings", {"model": "auto", "input": "Where is the nearest train station?",
                                       "encoding_format": "base64"}).json()
    assert isinstance(wire["data"][0]["embedding"], str)
    assert np.frombuffer(base64.b64decode(wire["data"][0]["embedding"]), dtype="<f4").tolist() == floats


def test_cloud_target_gets_the_raw_text_and_dimensions(gw: RunningGateway, cloud: EmbeddingsUpstream) -> None:
    raw = sdk(gw, **{"x-route": "cloud"}).embeddings.with_raw_response.create(
        model=CLOUD_SPACE, input=["hello world", "second input"], dimensions=4, encoding_format="float")
    CreateEmbeddingResponse.model_validate_json(raw.http_response.text, strict=True)
    res = raw.parse()
    assert raw.headers["x-hybrid-route"] == "cloud" and raw.headers["x-hybrid-embedding-space"] == CLOUD_SPACE
    assert [d.embedding for d in res.data] == [vector_for("hello world", 4), vector_for("second input", 4)]
    assert cloud.received[-1] == {"model": CLOUD_SPACE, "input": ["hello world", "second input"],
                                  "encoding_format": "float", "dimensions": 4}
    assert res.usage.prompt_tokens == 4 and raw.headers["x-hybrid-usage"] == "reported"
    cloud.send_usage = False  # no usage upstream: estimated, and the header says so
    raw = sdk(gw, **{"x-route": "cloud"}).embeddings.with_raw_response.create(model=CLOUD_SPACE, input="x" * 40)
    assert raw.headers["x-hybrid-usage"] == "estimated" and raw.parse().usage.prompt_tokens == 10


def test_pii_under_a_redacting_rule_never_reaches_the_cloud(gw: RunningGateway, cloud: EmbeddingsUpstream) -> None:
    text = f"Please email {EMAIL} about the invoice."
    # Control: the same rule sends an input with nothing to redact to the cloud.
    ok = sdk(gw, **{"x-route": "private"}).embeddings.with_raw_response.create(model="auto", input="the invoice")
    assert ok.headers["x-hybrid-route"] == "cloud" and len(cloud.received) == 1
    with pytest.raises(openai.PermissionDeniedError) as err:
        sdk(gw, **{"x-route": "private"}).embeddings.create(model="auto", input=["fine", text])
    assert err.value.body["code"] == "sensitive_embedding_refused"  # type: ignore[index]
    assert EMAIL not in err.value.message
    # A rule that allows another space answers on the device instead.
    raw = sdk(gw, **{"x-route": "private-any-space"}).embeddings.with_raw_response.create(model="auto", input=text)
    assert raw.headers["x-hybrid-route"] == "engine"
    assert raw.headers["x-hybrid-embedding-space"] == "all-minilm-l6-v2"
    assert "kept on the device" in raw.headers["x-hybrid-warning"]
    assert len(raw.parse().data[0].embedding) == 384
    assert len(cloud.received) == 1 and all(EMAIL not in str(b) for b in cloud.received)


def test_cloud_failure_falls_back_only_where_the_rule_allows_another_space(
        gw: RunningGateway, cloud: EmbeddingsUpstream) -> None:
    cloud.fault = Fault("status", status=503, paths=("/embeddings",))
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gw, **{"x-route": "cloud"}).embeddings.create(model="auto", input="a sentence")
    assert err.value.status_code == 503 and err.value.response.headers["x-hybrid-rule"] == "to-cloud"
    raw = sdk(gw, **{"x-route": "cloud-any-space"}).embeddings.with_raw_response.create(model="auto", input="a sentence")
    assert raw.headers["x-hybrid-route"] == "engine"
    assert raw.headers["x-hybrid-fallback"] == "cloud->engine: status:503"
    assert raw.parse().model == "all-minilm-l6-v2"
    cloud.stop()  # offline: connection refused
    try:
        with pytest.raises(openai.InternalServerError):
            sdk(gw, **{"x-route": "cloud"}).embeddings.create(model=CLOUD_SPACE, input="a sentence")
        raw = sdk(gw, **{"x-route": "cloud-any-space"}).embeddings.with_raw_response.create(
            model=CLOUD_SPACE, input="a sentence")
        assert raw.headers["x-hybrid-route"] == "engine"
    finally:
        cloud.start()
    # A request for the cloud's space under a rule that routes to the device is refused, not mixed.
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gw).embeddings.create(model=CLOUD_SPACE, input="a sentence")
    assert err.value.body["code"] == "embedding_space_unavailable"  # type: ignore[index]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "auto", "input": [[1, 2, 3]]}, 400, "input"),
    ({"model": "auto", "input": [1, 2, 3]}, 400, "input"),
    ({"model": "auto", "input": []}, 400, "input"),
    ({"model": "auto", "input": ""}, 400, "input"),
    ({"model": "auto"}, 400, "input"),
    ({"model": "auto", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "auto", "input": "x", "dimensions": 128}, 400, "dimensions"),
    ({"model": "auto", "input": "x", "dimensions": "many"}, 400, "dimensions"),
    ({"model": "text-embedding-ada-002", "input": "x"}, 404, "model"),
    ({"input": "x"}, 400, "model"),
])
def test_bad_input_gets_openai_error_shape(gw: RunningGateway, body: dict[str, Any], status: int, param: str) -> None:
    r = post(gw, "/v1/embeddings", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert r.headers["x-request-id"]


def test_sdk_raises_on_token_arrays_and_blocked_rules(gw: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError, match="token-id arrays"):
        sdk(gw).embeddings.create(model="auto", input=[[1, 2, 3]])
    with pytest.raises(openai.PermissionDeniedError, match="Team is not allowed"):
        sdk(gw, **{"x-team": "blocked"}).embeddings.create(model="auto", input="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.base_url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="auto", input="x")


def test_fallback_within_the_space_and_litellm_embeddings(gw: RunningGateway, cloud: EmbeddingsUpstream) -> None:
    cloud.once(Fault("status", status=503, paths=("/embeddings",)))  # the direct call fails once
    raw = sdk(gw, **{"x-route": "same-space"}).embeddings.with_raw_response.create(
        model=CLOUD_SPACE, input=["one", "two"], dimensions=4, encoding_format="float")
    CreateEmbeddingResponse.model_validate_json(raw.http_response.text, strict=True)
    assert raw.headers["x-hybrid-route"] == "cloud-lite"  # same space: no rule permission needed
    assert raw.headers["x-hybrid-fallback"] == "cloud->cloud-lite: status:503"
    assert [d.embedding for d in raw.parse().data] == [vector_for("one", 4), vector_for("two", 4)]
    assert [b.get("dimensions") for b in cloud.received] == [4, 4] and cloud.received[-1]["input"] == ["one", "two"]


def test_policy_refuses_an_engine_embedding_model_it_cannot_run() -> None:
    from pydantic import ValidationError

    from gateway.policy.targets import LocalTarget

    engine = {"kind": "local", "engine": "local_engine", "model_path": "builtin:smollm2-135m"}
    assert LocalTarget.model_validate({**engine, "embeddings": {"model": "builtin:all-minilm-l6-v2"}})
    with pytest.raises(ValidationError, match="embeds with builtin:all-minilm-l6-v2 only"):
        LocalTarget.model_validate({**engine, "embeddings": {"model": "openai/text-embedding-3-small"}})


@pytest.mark.parametrize(("route", "text", "chain", "redacts"), [
    ("private", f"write to {EMAIL}", [], True),  # refused: no device target of the cloud's space
    ("private-any-space", f"write to {EMAIL}", ["engine"], True),
    ("private", "a cat on a mat", ["cloud"], False),
    ("same-space", "a cat on a mat", ["cloud", "cloud-lite"], False),
])
def test_explain_shows_the_embedding_plan(gw: RunningGateway, route: str, text: str, chain: list[str],
                                          redacts: bool) -> None:
    """POST /v1/route/explain with an embeddings body, and `explain --embeddings` on the policy file,
    say which targets may embed the input, in which space, and why a sensitive one stays home."""
    from gateway.explain import LocalView, explain_embeddings_local

    body = {"model": CLOUD_SPACE, "input": text}
    r = post(gw, "/v1/route/explain", body, headers={"x-route": route})
    assert r.status_code == 200, r.text
    plan = r.json()["embeddings"]
    assert plan["chain"] == chain and plan["would_redact"] is redacts and plan["redacted"] is False
    assert plan["space_asked"] == CLOUD_SPACE
    if not chain:
        assert plan["refused"]["code"] == "sensitive_embedding_refused"
    else:
        assert plan["space"] == CLOUD_SPACE
    local = asyncio.run(explain_embeddings_local(gw.state.runtime.policy, "p.yaml", body,
                                                 LocalView(headers={"x-route": route})))
    assert local["embeddings"]["chain"] == chain and local["decision"] == r.json()["decision"]


def test_explain_refuses_an_unknown_embedding_model_as_the_endpoint_does(gw: RunningGateway) -> None:
    r = post(gw, "/v1/route/explain", {"model": "no-such-embedder", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
