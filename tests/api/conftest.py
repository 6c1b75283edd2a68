"""A gateway between the official SDKs and two fake chat-completions upstreams on loopback.

The cloud echoes the last user message (and answers with a tool call, streamed too, when the
request asks for one), so placeholders come back to be restored; the local target continues a
broken answer (`continue_final_message`) with TAIL, or answers "local answer".
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gateway import RunningGateway, reset_upstreams, run_gateway
from tests.support.policies import policy_yaml
from tests.support.tool_upstream import ToolStreamingUpstream

KEY = "key-one"
EMAIL = "maria.gonzalez@example.com"
CARD = "4111 1111 1111 1111"
TAIL = " and that is the rest of the answer."

POLICY = """
clients:
  - {name: app, api_key: key-one}
connectivity:
  probe_interval_s: 30
  failures_to_offline: 1000  # the fault tests break the cloud on purpose: keep it in the chains
limits:
  classify_budget_ms: 20000
privacy:
  nlp_model: none
difficulty:
  method: heuristic
rules:
  - name: forbidden
    when: { header: { x-team: blocked } }
    block: { status: 403, message: "Team is not allowed." }
  - name: private
    when: { header: { x-route: private } }
    route: cloud
    redact: true
    fallback: [local]
  - name: cloud-only
    when: { header: { x-route: cloud-only } }
    route: cloud
    fallback: []
  - name: to-cloud
    when: { header: { x-route: cloud } }
    route: cloud
    fallback: [local]
  - name: default
    route: local
"""


def _continuation(body: dict[str, Any]) -> str:
    last = body["messages"][-1]
    return TAIL if last["role"] == "assistant" and body.get("continue_final_message") else "local answer"


@pytest.fixture(scope="module")
def cloud() -> Iterator[ToolStreamingUpstream]:
    with ToolStreamingUpstream(model="cloud-model", name="cloud") as up:
        yield up


@pytest.fixture(scope="module")
def local() -> Iterator[ToolStreamingUpstream]:
    with ToolStreamingUpstream(model="local-model", name="local", reply=_continuation) as up:
        yield up


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: ToolStreamingUpstream,
       local: ToolStreamingUpstream) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("wire") / "policy.yaml"
    path.write_text(policy_yaml(cloud.base_url, local.base_url, cloud={"timeout_s": 2, "retries": 0},
                                local={"timeout_s": 5, "continues_answers": True}, rest=POLICY))
    with run_gateway(path, audit_path=str(path.parent / "audit.jsonl")) as running:
        yield running


def audit_line(gw: RunningGateway, request_id: str) -> dict[str, Any]:
    """The audit record of one request (written when its response has been sent)."""
    audit = Path(gw.state.settings.audit_path or "")
    for _ in range(100):
        for line in audit.read_text().splitlines() if audit.exists() else ():
            record = json.loads(line)
            if record.get("request_id") == request_id:
                return record
        time.sleep(0.02)
    raise AssertionError(f"no audit line for {request_id}")


__all__ = ["reset_upstreams"]  # autouse (tests/support/gateway.py): each test starts with empty recordings


def sse(gw: RunningGateway, path: str, body: dict[str, Any],
        headers: dict[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """POST a streaming request; the (event name, data) pairs it answered with, in order."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    with httpx.Client(base_url=gw.base_url, timeout=30, trust_env=False) as c, \
            c.stream("POST", path, json=body, headers={"x-api-key": KEY, **(headers or {})}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def post(gw: RunningGateway, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(base_url=gw.base_url, timeout=30, trust_env=False) as c:
        return c.post(path, json=body, headers={"x-api-key": KEY, **(headers or {})})
