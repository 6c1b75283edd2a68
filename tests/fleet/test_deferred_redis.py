"""Deferred requests on Redis with two replicas: accepted on either while the cloud is down, the
store holds no raw PII, each sent exactly once when the cloud is back (the replicas race to claim),
and fetched from either replica by the client that sent it only."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.fleet.redis_server import RedisServer
from tests.fleet.test_deferred import PII, PROMPT, _Hooks, defer, wait_for
from tests.support import policies
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.slow  # a real redis-server and two gateway replicas

REST = """
state: {{backend: redis, url: "{url}", timeout_ms: 5000}}
clients:
  - {{name: app, api_key: sk-app}}
  - {{name: other, api_key: sk-other}}
  - {{name: tight, api_key: sk-tight, budget: {{usd: 0.1, period: day, hold_tokens: 7}}}}
connectivity: {{probe_interval_s: 0.3, probe_timeout_s: 0.5, failures_to_offline: 1, successes_to_online: 1}}
limits: {{classify_budget_ms: 20000}}
privacy: {{analysis_budget_ms: 20000}}
deferred: {{poll_s: 0.1}}
rules:
  - name: cloud-only
    route: cloud
    redact: true
    fallback: []
    defer_when_offline: true
"""


@pytest.fixture
def down_cloud() -> Iterator[FakeUpstream]:
    up = FakeUpstream(model="cloud-model", name="cloud").start()
    up.stop()
    yield up
    up.stop()


@pytest.fixture
def two(tmp_path: Path, down_cloud: FakeUpstream, local: FakeUpstream, redis_server: RedisServer,
        vault_key: str) -> Iterator[list[RunningGateway]]:
    path = policies.write_policy(tmp_path / "p.yaml", down_cloud, local, REST.format(url=redis_server.url),
                                 cloud_settings={"timeout_s": 5, "retries": 0,
                                                 "prices": "{input: 1000, output: 10000}"})
    with ExitStack() as stack:
        yield [stack.enter_context(run_gateway(path)) for _ in range(2)]


def get(gw: RunningGateway, job_id: str, key: str = "sk-app") -> httpx.Response:
    return httpx.get(f"{gw.base_url}/v1/deferred/{job_id}", headers={"Authorization": f"Bearer {key}"},
                     timeout=10, trust_env=False)


def test_two_replicas_send_each_deferred_request_once(two: list[RunningGateway], down_cloud: FakeUpstream,
                                                      redis_server: RedisServer) -> None:
    a, b = two
    for gw in two:
        wait_for(lambda gw=gw: gw.state.runtime.monitor.state("cloud") == "offline", what="cloud offline")
    auth = {"Authorization": "Bearer sk-app"}
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook = {"x-hybrid-callback-url": f"http://127.0.0.1:{hooks.server_address[1]}/done"}
    ids = []
    for i, gw in enumerate([a, b, a, b, a, b]):
        status, job, _ = defer(gw.base_url, {**auth, "Idempotency-Key": f"job-{i}", **(hook if i == 5 else {})},
                               text=f"{PROMPT} Item {i}.")
        assert status == 202, job
        ids.append(job["id"])
    # The same key on the other replica: the same job (the store deduplicates, not the replica).
    status, again, _ = defer(b.base_url, {**auth, "Idempotency-Key": "job-0"})
    assert again["id"] == ids[0]
    assert len(set(ids)) == 6
    dump = b"\n".join(redis_server.dump())
    assert ids[0].encode() in dump
    for value in PII:
        assert value.encode() not in dump, "raw PII in Redis"
    # Another client cannot read it (the same 404 as an unknown id); its own client can, anywhere.
    assert get(b, ids[0], key="sk-other").status_code == 404
    assert get(b, ids[0]).json()["status"] == "queued"

    down_cloud.start()
    for job_id in ids:
        wait_for(lambda job_id=job_id: get(a, job_id).json()["status"] == "completed", what=f"{job_id} completed")
    time.sleep(0.5)  # more ticks of both workers: nothing is sent twice
    assert len(down_cloud.received) == 6
    items = sorted(json.dumps(body).count("Item") for body in down_cloud.received)
    assert items == [1] * 6
    texts = sorted(next(m["content"] for m in body["messages"] if m["role"] == "user")[-7:]
                   for body in down_cloud.received)
    assert texts == [f"Item {i}." for i in range(6)]
    done = get(b, ids[3]).json()
    for value in PII:
        assert value in done["response"]["choices"][0]["message"]["content"]
        assert all(value not in json.dumps(body) for body in down_cloud.received)
    # Each sent once, each counted once on the client's shared usage (not when deferred: then).
    def usage() -> dict:
        return httpx.get(f"{b.base_url}/v1/usage", headers=auth, timeout=10, trust_env=False).json()
    wait_for(lambda: usage()["requests"] == 6, what="deferred answers counted")  # settled by either worker
    time.sleep(0.3)
    assert usage()["requests"] == 6 and usage()["by_target"]["cloud"]["tokens"] == 6 * 12
    # The callback went out once, restored, and its state is on the shared store.
    wait_for(lambda: get(a, ids[5]).json()["callback"] == "delivered", what="callback delivered")
    sent = [body for _, body in _Hooks.received if body["id"] == ids[5]]
    assert len(sent) == 1 and PII[0] in sent[0]["response"]["choices"][0]["message"]["content"]
    hooks.shutdown()
    hooks.server_close()
    for value in PII:
        assert value.encode() not in b"\n".join(redis_server.dump())


def usage(gw: RunningGateway, key: str) -> dict:
    return httpx.get(f"{gw.base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10,
                     trust_env=False).json()


def test_a_queued_request_reserves_nothing_and_holds_its_cost_once_it_is_sent(
        two: list[RunningGateway], down_cloud: FakeUpstream, redis_server: RedisServer) -> None:
    a, b = two
    for gw in two:
        wait_for(lambda gw=gw: gw.state.runtime.monitor.state("cloud") == "offline", what="cloud offline")
    auth = {"Authorization": "Bearer sk-tight"}
    # "hello" holds up to $0.071 (1 prompt token + hold_tokens 7 at 1000 / 10000 per 1M) and the
    # $0.1 budget has room for one such hold: each acceptance below would be a 429 if a request
    # queued before it (on either replica) still held its share.
    ids = []
    for i, gw in enumerate([a, b, a]):
        status, job, _ = defer(gw.base_url, {**auth, "Idempotency-Key": f"tight-{i}"}, text="hello")
        assert status == 202, job
        ids.append(job["id"])
    for gw in two:
        report = usage(gw, "sk-tight")
        assert (report["held_usd"], report["spent_usd"], report["requests"]) == (0, 0, 0), report
    counters = redis_server.client().hgetall(next(
        k for k in redis_server.client().scan_iter("hg:usage:tight:*") if redis_server.client().type(k) == b"hash"))
    assert float(counters.get(b"held", 0)) == pytest.approx(0, abs=1e-9)
    assert not [f for f in counters if f.startswith(b"hold:")]

    # Sent, each job holds like any request: one answer ($0.075) leaves no room for another hold,
    # so the budget is kept across both workers and the other two fail without being sent.
    down_cloud.start()
    final = [wait_for(lambda job_id=job_id: (r := get(a, job_id, key="sk-tight").json())["status"]
                      in ("completed", "failed") and r, what=f"{job_id} done") for job_id in ids]
    assert sorted(j["status"] for j in final) == ["completed", "failed", "failed"], final
    refused = [j["error"] for j in final if j["status"] == "failed"]
    assert all(e["code"] == "budget_exceeded" and "$0.1" in e["message"] for e in refused), refused
    time.sleep(0.5)  # more ticks of both workers: nothing else goes out
    assert len(down_cloud.received) == 1
    wait_for(lambda: usage(b, "sk-tight")["requests"] == 1, what="the answer counted")
    report = usage(a, "sk-tight")
    assert report["spent_usd"] == pytest.approx(0.075) and report["held_usd"] == 0 and report["requests"] == 1
