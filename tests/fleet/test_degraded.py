"""Redis killed mid-run: the replicas keep serving, per the documented degraded mode, without a
hang (conversation vaults fail closed to the local target, rate limits fall back to each
replica's own buckets, the admin switch applies locally), and the shared state returns with Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from gateway.cli import main as cli
from tests.fleet.redis_server import RedisServer
from tests.fleet.test_replicas import ADMIN, write_policy
from tests.privacy.bodies import PLANTED
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.slow  # a real redis-server and gateway replicas


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-down")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream,
         own_redis: RedisServer, vault_key: str) -> Iterator[list[RunningGateway]]:
    path = write_policy(tmp_path_factory.mktemp("fleet-down") / "p.yaml", cloud, local, own_redis.url)
    with ExitStack() as stack:
        yield [stack.enter_context(run_gateway(path)) for _ in range(2)]


def chat(gw: RunningGateway, text: str, key: str = "sk-app", conversation: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if conversation:
        headers["x-hybrid-conversation-id"] = conversation
    with httpx.Client(base_url=gw.base_url, timeout=30, trust_env=False) as c:
        return c.post("/v1/chat/completions", headers=headers,
                      json={"model": "auto", "messages": [{"role": "user", "content": text}]})


def test_redis_killed_mid_run_then_back(pair: list[RunningGateway], own_redis: RedisServer,
                                       cloud: FakeUpstream, local: FakeUpstream) -> None:
    a, b = pair
    turn = f"I am {PLANTED['person']}, mail {PLANTED['email']}"
    assert chat(a, turn, conversation="conv-down").headers["x-hybrid-route"] == "cloud"
    cloud.reset()

    own_redis.kill()
    t0 = time.monotonic()
    # A conversation's turn: its vault cannot be read, so nothing of it goes to the cloud.
    r = chat(b, f"Send it to {PLANTED['email']}", conversation="conv-down")
    assert r.status_code == 200 and r.headers["x-hybrid-route"] == "local", r.text
    assert r.json()["choices"][0]["message"]["content"] == "local answer"
    assert cloud.received == []
    # A request without a conversation needs no shared state: still redacted to the cloud.
    r = chat(a, f"Mail {PLANTED['email']} please")
    assert r.status_code == 200 and r.headers["x-hybrid-route"] == "cloud"
    assert PLANTED["email"] not in str(cloud.received)
    # Rate limits in local approximation: each replica enforces 6/min on its own.
    statuses = [chat(a, "hello", key="sk-burst").status_code for _ in range(8)]
    assert statuses == [200] * 6 + [429] * 2
    # The admin switch still works on the replica that got it, and says it did not reach the fleet.
    with a.client() as http:
        r = http.post("/admin/connectivity", json={"target": "cloud", "force": "auto"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["fleet"] is False
    assert time.monotonic() - t0 < 10  # nothing waited on the dead store

    own_redis.start()  # same port, empty: the state returns, the old conversation is gone
    time.sleep(1.2)  # the store's cool-down after a failure
    cloud.reset()
    first = chat(a, turn, conversation="conv-back")
    assert first.headers["x-hybrid-route"] == "cloud", first.text
    second = chat(b, f"Send it to {PLANTED['email']}", conversation="conv-back")
    assert second.headers["x-hybrid-route"] == "cloud"
    assert second.json()["choices"][0]["message"]["content"] == f"echo: Send it to {PLANTED['email']}"
    assert cloud.received[1]["messages"][-1]["content"] == "Send it to <EMAIL_ADDRESS_1>"

    def switched() -> bool:  # the subscriptions reconnected: a switch on b reaches a again
        with b.client() as http:
            http.post("/admin/connectivity", json={"target": "cloud", "force": "offline"}, headers=ADMIN)
        with a.client() as http:
            return http.get("/admin/connectivity", headers=ADMIN).json()["cloud"]["force"] == "offline"

    deadline = time.monotonic() + 10
    while not switched():
        assert time.monotonic() < deadline, "the admin switch never reached the other replica again"
        time.sleep(0.2)
    for gw in pair:
        with gw.client() as http:
            http.post("/admin/connectivity", json={"target": "cloud", "force": "auto"}, headers=ADMIN)


def test_redis_state_without_a_vault_key_is_a_clear_startup_error(
    tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_VAULT_KEY", raising=False)
    # `serve` configures process-wide logging onto the runner's stream: not in the test process.
    monkeypatch.setattr("gateway.logs.configure_logging", lambda *a, **k: None)
    path = write_policy(tmp_path / "p.yaml", cloud, local, "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(cli, ["serve", "--policy", str(path), "--port", "1"])
    assert result.exit_code == 2
    assert "cannot start" in result.output and "GATEWAY_VAULT_KEY is not set" in result.output
    assert "Traceback" not in result.output
