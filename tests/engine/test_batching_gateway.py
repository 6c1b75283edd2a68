"""Concurrent HTTP requests to an engine target share the engine's batch (real gateway on
loopback, the openai SDK as client): the answers equal one-by-one answers, the engine's stats show
decode steps with several sequences, and /metrics has the serving families (queue depth, active
sequences, batch size, TTFT histogram, prefix-cache hit ratio)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.support.gateway import RunningGateway, run_gateway

POLICY = """
version: 1
targets:
  local: {kind: local, engine: local_engine, model_path: "builtin:smollm2-135m", max_queue: 8, max_batch: 4,
          prefix_cache_mb: 0}
connectivity: {probe_interval_s: 30, failures_to_offline: 1000}
privacy: {enabled: false}
difficulty: {method: heuristic}
rules:
  - {name: all, route: local}
"""
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Who wrote Hamlet?", "What is 2+2?"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    d = tmp_path_factory.mktemp("batching")
    (d / "p.yaml").write_text(POLICY)
    with run_gateway(d / "p.yaml") as running:
        yield running


def _ask(client: openai.OpenAI, q: str, stream: bool) -> str:
    msgs = [{"role": "user", "content": q}]
    if stream:
        chunks = client.chat.completions.create(model="auto", max_tokens=24, messages=msgs, stream=True)  # type: ignore[arg-type]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    out = client.chat.completions.create(model="auto", max_tokens=24, messages=msgs)  # type: ignore[arg-type]
    return out.choices[0].message.content or ""


def test_concurrent_requests_share_the_batch(gw: RunningGateway, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    one_by_one = [_ask(client, q, stream=False) for q in QUESTIONS]
    backend = gw.state.runtime.dispatcher.backends["local"]
    steps0 = backend.stats()["serving"]["decode_steps"]
    tokens0 = backend.stats()["serving"]["decode_tokens"]
    jobs = [(q, i % 2 == 1) for i, q in enumerate(QUESTIONS * 2)]  # 8 requests, half streamed
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: _ask(client, *j), jobs))
    assert answers == one_by_one * 2
    s = backend.stats()["serving"]
    # 4 at a time: fewer decode steps than tokens
    assert s["decode_tokens"] - tokens0 > 1.5 * (s["decode_steps"] - steps0)
    assert s["max_batch"] == 4 and s["active_sequences"] == 0 and s["queue_depth"] == 0
    metrics = gw.client().get("/metrics").text
    for family in ("hybrid_engine_queue_depth", "hybrid_engine_active_sequences", "hybrid_engine_batch_size",
                   "hybrid_engine_prefix_cache_hit_ratio"):
        assert re.search(rf'^{family}{{target="local"}} ', metrics, re.M), family
    count = re.search(r'^hybrid_engine_ttft_seconds_count{target="local"} (\S+)$', metrics, re.M)
    assert count and float(count.group(1)) == s["ttft"]["count"] >= 12
    assert re.search(r'^hybrid_engine_ttft_seconds_bucket{le="\+Inf",target="local"} ', metrics, re.M)


DEEP_QUEUE_POLICY = POLICY.replace("max_queue: 8, max_batch: 4", "max_batch: 8")


def test_a_burst_past_the_batch_waits_and_completes(tmp_path: Path) -> None:
    """max_queue absent: 4 x max_batch. 16 requests at once with max_batch 8: the 9th..16th wait
    for a seat (seen in the queue while the first 8 decode) and all complete; none gets a 503."""
    import threading

    (tmp_path / "p.yaml").write_text(DEEP_QUEUE_POLICY)
    with run_gateway(tmp_path / "p.yaml") as running:
        client = openai.OpenAI(base_url=running.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        backend = running.state.runtime.dispatcher.backends["local"]
        assert backend.max_queue == 32 and backend.max_batch == 8
        expected = {q: _ask(client, q, stream=False) for q in QUESTIONS}
        waiting_seen = active_seen = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal waiting_seen, active_seen
            while not stop.is_set():
                s = backend.stats()
                serving = s.get("serving", {})
                waiting_seen = max(waiting_seen, s["queued"] + serving.get("queue_depth", 0))
                active_seen = max(active_seen, serving.get("active_sequences", 0))
                stop.wait(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        jobs = [(q, i % 2 == 1) for i, q in enumerate(QUESTIONS * 4)]  # 16 requests, half streamed
        try:
            with ThreadPoolExecutor(len(jobs)) as pool:
                answers = list(pool.map(lambda j: _ask(client, *j), jobs))
        finally:
            stop.set()
            watcher.join()
        assert answers == [expected[q] for q, _ in jobs]
        s = backend.stats()
        assert s["rejected_overloaded"] == 0 and s["serving"]["rejected_queue_full"] == 0
        assert s["serving"]["admitted"] == 16 + len(QUESTIONS)
        assert waiting_seen >= 8 and active_seen == 8  # the 9th..16th waited for a seat, not refused
        assert s["memory_kv_sequences"] == 8
        assert s["memory_kv_total_bytes"] == 8 * s["memory_kv_max_bytes"]
