"""A client that gives up on a NON-streamed request stops the local engine within a step.

Nothing is sent before the answer is whole, so the gateway must watch the connection while the
body is produced. Measured with the engine's own step counter (forward passes since load), not
wall time: the request that comes next starts right after the abandoned one's last step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.support.gateway import RunningGateway, run_gateway

POLICY = """
version: 1
targets:
  local: {kind: local, engine: local_engine, model_path: "builtin:smollm2-135m", default_max_tokens: 16}
connectivity: {probe_interval_s: 30, failures_to_offline: 1000}
privacy: {enabled: false}
difficulty: {method: heuristic}
rules:
  - {name: all, route: local}
"""
LONG = "Write a very long story about a lighthouse keeper, chapter by chapter."
# Steps the abandoned request may still run after the client's socket closed: the one in flight
# when the gateway sees the disconnect, one more while the cancel crosses from the event loop to
# the worker thread, and the steps a loaded 2-core machine runs between the client closing its
# socket and the event loop reading the disconnect (a decode step is ~10 ms; under a load of 6
# the loop was seen to lag by several). Before the fix it ran all 1,500 tokens (hundreds of
# steps after 1 s), so the bound still tells the two apart.
SLACK_STEPS = 16


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway, Path]]:
    d = tmp_path_factory.mktemp("cancel")
    (d / "p.yaml").write_text(POLICY)
    audit = d / "audit.jsonl"
    with run_gateway(d / "p.yaml", audit_path=str(audit)) as running:
        yield running, audit


def _wait(cond: Callable[[], Any], seconds: float = 10.0) -> Any:
    end = time.monotonic() + seconds
    while not (got := cond()) and time.monotonic() < end:
        time.sleep(0.02)
    return got


def _abandon_then_next(gw: RunningGateway, abandon: Callable[[], None], next_request: Callable[[], None]) -> None:
    backend = gw.state.runtime.dispatcher.backends["local"]
    next_request()  # loads the model (and warms the path) first
    cancelled = backend.stats()["cancelled"]
    steps_before = backend.engine.steps
    abandon()  # the client times out after ~1 s and closes its connection
    gone_at = backend.engine.steps
    assert gone_at - steps_before > 3, "the abandoned request never started decoding"
    next_request()
    started = backend.stats()["last_start_step"]
    assert started - gone_at <= SLACK_STEPS, f"the engine ran {started - gone_at} steps for a client that had left"
    # Generous: once (1 in ~5 full runs, quiet box too) the count had not moved after 10 s although the
    # step bound above held; whether the cancel was late or lost is not yet known (see the closing note).
    assert _wait(lambda: backend.stats()["cancelled"] == cancelled + 1, seconds=60), \
        f"cancelled stayed {backend.stats()['cancelled']} (was {cancelled})"


def _audit_line(audit: Path, endpoint: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        lines = [orjson.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []
        return next((x for x in reversed(lines) if x["endpoint"] == endpoint and x["status"] == 499), None)

    return _wait(find)


def test_abandoned_chat_completion_stops_the_engine(gw: tuple[RunningGateway, Path]) -> None:
    running, audit = gw
    client = openai.OpenAI(base_url=running.base_url + "/v1", api_key="x", max_retries=0, timeout=60)

    def abandon() -> None:
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=1.0).chat.completions.create(
                model="auto", max_tokens=1500, messages=[{"role": "user", "content": LONG}])

    def next_request() -> None:
        out = client.chat.completions.create(model="auto", max_tokens=4,
                                             messages=[{"role": "user", "content": "Hi"}])
        assert out.choices[0].message.content

    _abandon_then_next(running, abandon, next_request)
    line = _audit_line(audit, "/v1/chat/completions")
    assert line and line["error"] == "cancelled" and line["stream"] is False
    metrics = running.client().get("/metrics").text
    assert 'hybrid_requests_total{endpoint="/v1/chat/completions",route="-",rule="all",status="499"} 1.0' in metrics
    assert 'hybrid_engine_stat{stat="cancelled",target="local"}' in metrics


def test_abandoned_message_stops_the_engine(gw: tuple[RunningGateway, Path]) -> None:
    running, audit = gw
    client = anthropic.Anthropic(base_url=running.base_url, api_key="x", max_retries=0, timeout=60)

    def abandon() -> None:
        with pytest.raises(anthropic.APITimeoutError):
            client.with_options(timeout=1.0).messages.create(
                model="auto", max_tokens=1500, messages=[{"role": "user", "content": LONG}])

    def next_request() -> None:
        out = client.messages.create(model="auto", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert out.content

    _abandon_then_next(running, abandon, next_request)
    line = _audit_line(audit, "/v1/messages")
    assert line and line["error"] == "cancelled"
