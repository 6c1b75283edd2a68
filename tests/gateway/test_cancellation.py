"""A client that gives up on a NON-streamed request stops the local engine within a step.

Nothing is sent before the answer is whole, so the gateway must watch the connection while the
body is produced. Measured with the engine's own step counter (forward passes since load), not
wall time: the request that comes next starts right after the abandoned one's last step.
"""

from __future__ import annotations

import asyncio
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
    # Nothing else runs meanwhile, so the steps until it is recorded cancelled are the abandoned
    # request's own (with continuous batching the next request would start at once anyway: the
    # step bound must be taken on the abandoned one, not on when the next one starts).
    assert _wait(lambda: backend.stats()["cancelled"] == cancelled + 1), \
        f"not recorded cancelled: backend stats {backend.stats()}"
    assert backend.engine.steps - gone_at <= SLACK_STEPS, \
        f"the engine ran {backend.engine.steps - gone_at} steps for a client that had left"
    next_request()
    assert backend.stats()["last_start_step"] - gone_at <= SLACK_STEPS + 1


def test_a_cancel_in_the_same_loop_turn_as_a_token_is_not_lost() -> None:
    """The interleaving that lost ~1 abandoned request in 5: the engine's next token completes the
    awaited queue read, and the client's cancel lands before the reader resumes. Python 3.11's
    asyncio.wait_for then returned the token and dropped the cancel (bpo-42130)."""
    from gateway.backends.engine_backend import EngineBackend, _Job

    async def scenario(turns: int) -> bool:
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        job = _Job(messages=[], sampling={}, deadline=time.monotonic() + 60, emit=events.put_nowait)
        reader = asyncio.ensure_future(EngineBackend("local", "builtin:smollm2-135m")._next(job, events))
        await asyncio.sleep(0)  # the reader waits on the queue
        events.put_nowait(("delta", "x"))  # a token arrives ...
        for _ in range(turns):  # ... and the loop runs on a little: the read completes
            await asyncio.sleep(0)
        if reader.done():
            return False  # the token was taken before the client left: nothing to cancel
        reader.cancel()  # the client leaves while the reader has not resumed
        with pytest.raises(asyncio.CancelledError):
            await reader
        return True

    assert sum(asyncio.run(scenario(turns)) for turns in range(4)) >= 1


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
