"""Three real gateway replicas on one real redis-server: a spend budget holds across them under
concurrent load (each request holds its maximum cost before dispatch: no overshoot) and its usage
is counted exactly, an outage's usage included once the store is back; a policy reload asked of one replica reaches
every replica, each of which re-reads and validates the file itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.fleet.redis_server import RedisServer
from tests.support import policies
from tests.support.gateway import RunningGateway, free_port, run_gateway
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.slow  # a real redis-server and three gateway replicas

ADMIN = {"Authorization": "Bearer admin-secret"}
# Each fake cloud answer reports 5 prompt + 7 completion tokens: 5 * 1000 / 1e6 + 7 * 10000 / 1e6.
ANSWER_USD = 0.075
BUDGET_USD = 0.6  # exactly 8 answers
# Each request holds 1 prompt token ("hello" by the ~4 characters estimate) + hold_tokens 7: a
# hold of $0.071, over BUDGET_USD / 9, so a 9th answer never fits beside 8 spent or held, however
# they interleave.

POLICY = """
state:
  backend: redis
  url: {url}
  timeout_ms: 5000   # about sharing, not degrading: a loaded CI box must not turn a slow call into a local fallback
connectivity:
  probe_interval_s: 30
clients:
  - {{name: team, api_key: sk-team, budget: {{usd: {budget}, period: day, hold_tokens: 7}}}}
  - {{name: crowd, api_key: sk-crowd, budget: {{usd: {budget}, period: day, hold_tokens: 7}}}}
  - {{name: app, api_key: sk-app}}
  - {{name: solo, api_key: sk-solo, budget: {{usd: 0.2, period: day, hold_tokens: 7}}}}
limits:
  classify_budget_ms: 20000
privacy:
  analysis_budget_ms: 20000
rules:
{extra}  - name: cloud
    route: cloud
    fallback: [local]
"""


def write(path: Path, cloud: FakeUpstream, local: FakeUpstream, url: str, extra: str = "") -> Path:
    return policies.write_policy(
        path, cloud, local, rest=POLICY.format(url=url, budget=BUDGET_USD, extra=extra),
        cloud_settings={"timeout_s": 5, "retries": 0, "prices": "{input: 1000, output: 10000}"})


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream,
                redis_server: RedisServer) -> Path:
    return write(tmp_path_factory.mktemp("fleet-budgets") / "p.yaml", cloud, local, redis_server.url)


@pytest.fixture(scope="module")
def replicas(policy_path: Path, redis_server: RedisServer, vault_key: str) -> Iterator[list[RunningGateway]]:
    with ExitStack() as stack:
        yield [stack.enter_context(run_gateway(policy_path)) for _ in range(3)]


def chat(gw: RunningGateway, key: str) -> httpx.Response:
    with httpx.Client(base_url=gw.base_url, timeout=30, trust_env=False) as c:
        return c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "auto", "messages": [{"role": "user", "content": "hello"}]})


def usage(gw: RunningGateway, key: str) -> dict:
    with gw.client() as c:
        return c.get("/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()


def usage_key(redis_server: RedisServer, client: str) -> bytes:
    """The client's counters for this period (beside them: its holds and settled markers)."""
    return next(k for k in redis_server.client().scan_iter(f"hg:usage:{client}:*")
                if redis_server.client().type(k) == b"hash")


def until_refused(gw: RunningGateway, key: str) -> list[int]:
    """Requests one after another on one replica until the budget refuses one."""
    statuses: list[int] = []
    while not statuses or statuses[-1] == 200:
        statuses.append(chat(gw, key).status_code)
        assert len(statuses) < 50, "the budget never refused"
    return statuses


def test_a_budget_holds_exactly_across_replicas_with_one_request_in_flight_on_each(
        replicas: list[RunningGateway], redis_server: RedisServer) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:  # one client connection per replica, all at once
        runs = list(pool.map(lambda gw: until_refused(gw, "sk-team"), replicas))
    assert all(run[-1] == 429 for run in runs), runs
    served = sum(run.count(200) for run in runs)
    # Held before dispatch: 8 answers spend the budget and not one more got through, whichever
    # replica ran out first (a replica stops at its first 429; the last to stop saw nothing in flight).
    assert served == 8, runs
    # Counted exactly, by every replica into one total: what the store holds, what each reports.
    reports = [usage(gw, "sk-team") for gw in replicas]
    for r in reports:
        r["period"].pop("resets_in_s")  # read a moment apart
    assert all(r == reports[0] for r in reports), reports
    assert reports[0]["requests"] == served and reports[0]["shared"] is True and reports[0]["held_usd"] == 0
    assert reports[0]["spent_usd"] == pytest.approx(served * ANSWER_USD, abs=1e-9)
    assert reports[0]["prompt_tokens"] == 5 * served and reports[0]["completion_tokens"] == 7 * served
    key = usage_key(redis_server, "team")
    assert float(redis_server.client().hget(key, "usd")) == pytest.approx(served * ANSWER_USD, abs=1e-9)
    assert 0 < redis_server.client().pttl(key) <= 86_460_000  # gone once the day (and a minute) is over
    # And every replica now refuses, in OpenAI's shape, until the day ends.
    for gw in replicas:
        r = chat(gw, "sk-team")
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
        assert 1 <= int(r.headers["retry-after"]) <= 86_400


def test_under_heavier_load_there_is_no_overshoot(replicas: list[RunningGateway],
                                                   redis_server: RedisServer) -> None:
    with ThreadPoolExecutor(max_workers=9) as pool:  # three at a time on each replica
        answers = list(pool.map(lambda i: chat(replicas[i % 3], "sk-crowd").status_code, range(30)))
    served = answers.count(200)
    assert answers.count(429) == 30 - served
    # A refusal means 8 were spent or held already (7 never fill $0.6 beside one more hold), and
    # the 9th never fits: with nine in flight at once, exactly the budget is served.
    assert served == 8, answers
    # Every hold settled: the last answers' settles go with their replica's next store call, or
    # on their own a moment after the replica goes quiet.
    def settled() -> bool:
        held = redis_server.client().hgetall(usage_key(redis_server, "crowd"))
        return abs(float(held[b"held"])) < 1e-9 and not [f for f in held if f.startswith(b"hold:")]
    assert _wait_for(settled)
    report = usage(replicas[1], "sk-crowd")
    assert report["requests"] == served
    assert report["spent_usd"] == pytest.approx(served * ANSWER_USD, abs=1e-9)


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _rule(gw: RunningGateway) -> str:
    return chat(gw, "sk-app").headers.get("x-hybrid-rule", "")


def _policy_error(gw: RunningGateway) -> str | None:
    with gw.client() as c:
        return c.get("/readyz").json()["policy_error"]


def test_a_reload_on_one_replica_reloads_every_replica(replicas: list[RunningGateway], policy_path: Path,
                                                        cloud: FakeUpstream, local: FakeUpstream,
                                                        redis_server: RedisServer) -> None:
    a, b, c = replicas
    assert {_rule(gw) for gw in replicas} == {"cloud"}
    good = policy_path.read_text()
    write(policy_path, cloud, local, redis_server.url, extra="  - {name: reloaded, when: {client: app}, route: local}\n")
    try:
        with a.client() as http:
            r = http.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"reloaded": True, "policy_error": None, "fleet": True}
        assert _wait_for(lambda: all(_rule(gw) == "reloaded" for gw in replicas))

        # A bad edit: every replica validates the file itself, rejects it, keeps its last good policy.
        policy_path.write_text(policy_path.read_text().replace("route: local}", "route: nowhere}"))
        with b.client() as http:
            r = http.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 422 and r.json()["reloaded"] is False and r.json()["fleet"] is True
        assert f"{policy_path}:" in r.json()["policy_error"] and "nowhere" in r.json()["policy_error"]
        assert _wait_for(lambda: all(_policy_error(gw) for gw in replicas))
        assert {_rule(gw) for gw in replicas} == {"reloaded"}
        with c.client() as http:  # a reload needs the admin key
            assert http.post("/admin/reload").status_code == 401
    finally:
        policy_path.write_text(good)
        with c.client() as http:
            assert http.post("/admin/reload", headers=ADMIN).json()["reloaded"] is True
    assert _wait_for(lambda: all(_policy_error(gw) is None and _rule(gw) == "cloud" for gw in replicas))


def test_sighup_on_a_served_gateway_reloads_the_fleet(replicas: list[RunningGateway], policy_path: Path,
                                                      cloud: FakeUpstream, local: FakeUpstream,
                                                      redis_server: RedisServer) -> None:
    """`hybrid-gateway serve` in its own process (SIGHUP needs the main thread): a SIGHUP to it
    reloads the replicas in this process too."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy_path),
                             "--port", str(port), "--no-watch", "--log-level", "WARNING"],
                            env={**os.environ, "NO_PROXY": "*"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    good = policy_path.read_text()
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False
        assert _wait_for(up, timeout=120), f"the gateway did not start (exit code {proc.poll()})"
        write(policy_path, cloud, local, redis_server.url, extra="  - {name: hup, when: {client: app}, route: local}\n")
        proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: all(_rule(gw) == "hup" for gw in replicas))
        assert proc.poll() is None  # and it is still serving
    finally:
        policy_path.write_text(good)
        with replicas[0].client() as http:
            http.post("/admin/reload", headers=ADMIN)
        proc.terminate()
        proc.wait(20)
    assert _wait_for(lambda: all(_rule(gw) == "cloud" for gw in replicas))


def test_redis_down_budgets_go_on_in_local_approximation_and_come_back(
        replicas: list[RunningGateway], redis_server: RedisServer) -> None:
    """Last in this module: it kills the module's redis-server (and starts it again, empty)."""
    a, b, _ = replicas
    assert chat(a, "sk-solo").status_code == 200  # $0.075 of $0.2 on Redis
    assert usage(a, "sk-solo")["requests"] == 1  # its settle landed (else it would be replayed below too)
    redis_server.kill()
    try:
        t0 = time.monotonic()
        # Replica a goes on from what it last knew plus what it charged since: one more answer
        # ($0.15 spent), then a hold of $0.071 no longer fits under $0.2.
        assert until_refused(a, "sk-solo") == [200, 429]
        report = usage(a, "sk-solo")
        assert report["shared"] is False and report["spent_usd"] == pytest.approx(2 * ANSWER_USD)
        # Replica b never read this client's spend: on its own it may spend the whole budget (the
        # documented N x approximation), and no more.
        assert until_refused(b, "sk-solo") == [200, 200, 429]
        assert time.monotonic() - t0 < 20  # nothing waited on the dead store
    finally:
        redis_server.start()  # the same port, empty (no persistence)
    # The shared state returns by itself, and what the replicas charged meanwhile is replayed onto
    # it, each answer once: a's one and b's two, on a fresh day's counter.
    assert _wait_for(lambda: usage(a, "sk-solo")["shared"] and usage(b, "sk-solo")["shared"], timeout=15)
    assert _wait_for(lambda: usage(a, "sk-solo")["requests"] == 3 == usage(b, "sk-solo")["requests"], timeout=5)
    assert usage(a, "sk-solo")["spent_usd"] == pytest.approx(3 * ANSWER_USD)
    r = chat(b, "sk-solo")  # $0.225 of $0.2, fleet-wide again
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
