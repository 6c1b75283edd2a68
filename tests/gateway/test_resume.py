"""A stream that breaks after its first tokens is finished by the next target that can continue it.

Real servers on loopback: the cloud breaks its stream mid-answer (fault injection); the next target
is either a fake OpenAI-compatible server marked `continues_answers: true` (it records what it got)
or the real in-process engine. Assertions are on what the client received and on what each
upstream received, PII included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import policies
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, Fault

EMAIL = "maria.gonzalez@example.com"
TAIL = " and that is the rest of the answer."

POLICY = """
connectivity:
  probe_interval_s: 30
privacy:
  nlp_model: none
difficulty:
  method: heuristic
rules:
  - name: private-then-cloud2
    when: { header: { x-route: cloud2 } }
    route: cloud
    redact: true
    fallback: [cloud2, local]
  - name: private
    when: { header: { x-route: private } }
    route: cloud
    redact: true
    fallback: [local]
  - name: default
    route: cloud
    fallback: [local]
"""


def write_policy(path: Path, servers: dict[str, FakeUpstream], local_continues: bool) -> Path:
    return policies.write_policy(
        path, servers["cloud"], servers["local"], rest=POLICY,
        cloud_settings={"timeout_s": 2, "retries": 0},
        local_settings={"timeout_s": 5, "continues_answers": local_continues},
        more_targets={"cloud2": {
            "kind": "cloud", "model": "openai/cloud2-model", "api_base": servers["cloud2"].base_url,
            "api_key": "sk-test-cloud2", "timeout_s": 2, "retries": 0, "continues_answers": True,
        }},
    )


def _continuation(body: dict[str, Any]) -> str:
    last = body["messages"][-1]
    return TAIL if last["role"] == "assistant" and body.get("continue_final_message") else "fresh answer"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, FakeUpstream]]:
    with FakeUpstream(model="cloud-model", name="cloud") as cloud, \
            FakeUpstream(model="cloud2-model", name="cloud2", reply=_continuation) as cloud2, \
            FakeUpstream(model="local-model", name="local", reply=_continuation) as local:
        yield {"cloud": cloud, "cloud2": cloud2, "local": local}


def _gateway(tmp_path: Path, servers: dict[str, FakeUpstream], local_continues: bool) -> Iterator[RunningGateway]:
    with run_gateway(write_policy(tmp_path / "p.yaml", servers, local_continues)) as gw:
        yield gw


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, servers: dict[str, FakeUpstream]) -> Iterator[RunningGateway]:
    yield from _gateway(tmp_path_factory.mktemp("resume"), servers, local_continues=True)


@pytest.fixture(autouse=True)
def _clean(servers: dict[str, FakeUpstream]) -> None:
    for s in servers.values():
        s.reset()


def _stream(gw: RunningGateway, content: str, route: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": content}], stream=True,
        extra_headers={"x-route": route} if route else None))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.model_dump() for c in chunks]


def test_broken_stream_is_finished_by_the_next_target(gw: RunningGateway, servers: dict[str, FakeUpstream]) -> None:
    servers["cloud"].fault = Fault("truncated", after_chunks=3)  # 3 chunks of 4 characters, then cut
    text, chunks = _stream(gw, "tell me something long")
    seen = "echo: tell m"
    assert text == seen + TAIL  # one answer, no error event, nothing lost or repeated
    got = servers["local"].received[-1]
    assert got["messages"][-1] == {"role": "assistant", "content": seen}
    assert got["continue_final_message"] is True and got["add_generation_prompt"] is False
    # the resumed part looks like the same stream to the client
    assert {c["id"] for c in chunks} == {"chatcmpl-test"} and {c["model"] for c in chunks} == {"cloud-model"}
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"] == "stop") == 1
    # the reason names the cause: the cut stream (no [DONE]) is a protocol error
    wanted = 'hybrid_fallbacks_total{reason="resumed_mid_stream:protocol",source="cloud",to="local"} 1.0'
    with httpx.Client(base_url=gw.base_url) as c:
        for _ in range(50):  # recorded when the response has been sent, a moment after the client's [DONE]
            metrics = c.get("/metrics").text
            if wanted in metrics:
                break
            time.sleep(0.05)
    assert wanted in metrics, [m for m in metrics.splitlines() if "fallbacks" in m]


def test_a_stall_mid_stream_is_resumed_too(gw: RunningGateway, servers: dict[str, FakeUpstream]) -> None:
    servers["cloud"].fault = Fault("stall_mid", seconds=6, after_chunks=2)
    text, _ = _stream(gw, "tell me something long")
    assert text == "echo: te" + TAIL


def test_redacted_answer_continues_locally_with_the_real_values(gw: RunningGateway,
                                                                servers: dict[str, FakeUpstream]) -> None:
    servers["cloud"].fault = Fault("truncated", after_chunks=8)  # "echo: mail <EMAIL_ADDRESS_1> now" arrived
    text, _ = _stream(gw, f"mail {EMAIL} now please", route="private")
    sent_to_cloud = str(servers["cloud"].received)
    assert EMAIL not in sent_to_cloud and "<EMAIL_ADDRESS_1>" in sent_to_cloud
    partial = servers["local"].received[-1]["messages"][-1]["content"]
    assert partial == f"echo: mail {EMAIL} now"  # the local target sees what the client saw: real values
    assert text == partial + TAIL


def test_a_placeholder_cut_by_the_break_is_not_shown_and_not_continued(gw: RunningGateway,
                                                                       servers: dict[str, FakeUpstream]) -> None:
    servers["cloud"].fault = Fault("truncated", after_chunks=5)  # "echo: mail <EMAIL_A", then the break
    text, _ = _stream(gw, f"mail {EMAIL} now please", route="private")
    assert servers["local"].received[-1]["messages"][-1]["content"] == "echo: mail "
    assert text == "echo: mail " + TAIL


def test_a_redacting_cloud_continues_with_placeholders_only(gw: RunningGateway,
                                                            servers: dict[str, FakeUpstream]) -> None:
    servers["cloud"].fault = Fault("truncated", after_chunks=8)
    text, _ = _stream(gw, f"mail {EMAIL} now please", route="cloud2")
    got = servers["cloud2"].received[-1]
    assert EMAIL not in str(got) and EMAIL.split("@")[0] not in str(got)
    assert got["messages"][-1] == {"role": "assistant", "content": "echo: mail <EMAIL_ADDRESS_1> now"}
    assert text == f"echo: mail {EMAIL} now" + TAIL
    assert servers["local"].received == []


def test_no_continuing_target_keeps_the_error_event(tmp_path: Path, servers: dict[str, FakeUpstream]) -> None:
    for gw in _gateway(tmp_path, servers, local_continues=False):
        servers["cloud"].fault = Fault("truncated", after_chunks=2)
        with pytest.raises(openai.APIError, match="interrupted"):
            _stream(gw, "tell me something long")
        assert servers["local"].received == []


def test_interrupted_tool_call_is_not_continued_as_text() -> None:
    from gateway.resume import Partial

    p = Partial()
    p.seen({"id": "a", "choices": [{"index": 0, "delta": {"content": "Let me check"}}]})
    assert p.resumable()
    p.seen({"id": "a", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c"}]}}]})
    assert not p.resumable()
