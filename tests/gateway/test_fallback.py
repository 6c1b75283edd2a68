"""Connectivity and fallback: the cloud dies and comes back, and no request is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import write_policy
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, Fault

CLOUD = {"x-route": "cloud"}


@pytest.fixture
def fresh(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream) -> Iterator[RunningGateway]:
    with run_gateway(write_policy(tmp_path / "p.yaml", cloud, local)) as gw:
        yield gw


def ask(gw: RunningGateway, stream: bool = False, headers: dict | None = None) -> httpx.Response:
    with gw.client() as c:
        return c.post("/v1/chat/completions", headers=headers or CLOUD,
                      json={"model": "auto", "stream": stream, "messages": [{"role": "user", "content": "ping"}]})


def wait_for(predicate, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=500),
        Fault("status", status=503, retry_after="0"),
        Fault("status", status=429, retry_after="30"),  # too long to wait: fall back at once
        Fault("reset"),
        Fault("invalid_json"),
        Fault("captive"),
        Fault("stall_first", seconds=8),
    ],
    ids=lambda f: f"{f.kind}-{f.status}",
)
def test_non_stream_failure_falls_back_transparently(fresh: RunningGateway, cloud: FakeUpstream, local: FakeUpstream,
                                                     fault: Fault):
    if fault.kind == "stall_first":
        # Keep the test fast: a 1 s target timeout instead of the policy's 5 s.
        fresh.state.runtime.backends["cloud"].timeout_s = 1.0
    cloud.fault = fault
    t0 = time.monotonic()
    r = ask(fresh)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "local answer"
    assert r.headers["x-hybrid-route"] == "local"
    assert r.headers["x-hybrid-fallback"].startswith("cloud->local: ")
    assert time.monotonic() - t0 < 6


@pytest.mark.parametrize("fault", [Fault("status", status=502), Fault("stall_first", seconds=8), Fault("reset")],
                         ids=lambda f: f.kind)
def test_stream_failure_before_first_token_falls_back(fresh: RunningGateway, cloud: FakeUpstream, fault: Fault):
    fresh.state.runtime.backends["cloud"].timeout_s = 1.0
    cloud.fault = fault
    client = openai.OpenAI(base_url=fresh.base_url + "/v1", api_key="x", max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "hello"}], stream=True, extra_headers=CLOUD
    ) as resp:
        assert resp.headers["x-hybrid-route"] == "local"
        assert "cloud->local" in resp.headers["x-hybrid-fallback"]
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text == "local answer"


@pytest.mark.parametrize("fault", [Fault("truncated", after_chunks=2), Fault("stall_mid", seconds=8, after_chunks=2)],
                         ids=lambda f: f.kind)
def test_stream_failure_after_tokens_ends_with_error_event(fresh: RunningGateway, cloud: FakeUpstream, fault: Fault):
    fresh.state.runtime.backends["cloud"].timeout_s = 1.0
    cloud.fault = fault
    client = openai.OpenAI(base_url=fresh.base_url + "/v1", api_key="x", max_retries=0)
    got = []
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as exc:
        for chunk in client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "a long enough answer"}], stream=True,
            extra_headers=CLOUD,
        ):
            got.append(chunk.choices[0].delta.content or "")
    assert "interrupted" in str(exc.value)
    assert "".join(got).startswith("echo")  # the tokens that did arrive were delivered
    assert time.monotonic() - t0 < 6  # ended, not hung


def test_kill_cloud_midrun_no_request_lost_then_recovers(fresh: RunningGateway, cloud: FakeUpstream):
    monitor = fresh.state.runtime.monitor
    for _ in range(5):
        r = ask(fresh)
        assert r.status_code == 200 and r.headers["x-hybrid-route"] == "cloud"

    cloud.stop()  # connection refused from now on
    try:
        served = []
        for i in range(20):
            r = ask(fresh, stream=bool(i % 2))
            assert r.status_code == 200, r.text
            served.append(r.headers["x-hybrid-route"])
        assert set(served) == {"local"}
        assert monitor.state("cloud") == "offline"
        # Once offline, the rule `offline` answers directly: no timeout, no fallback needed.
        r = ask(fresh)
        assert r.headers["x-hybrid-rule"] == "offline" and "x-hybrid-fallback" not in r.headers
        assert r.headers["x-hybrid-connectivity"] == "offline"
    finally:
        probes_before = monitor.health["cloud"].probes
        cloud.start()

    # Back online only after `successes_to_online` good probes (hysteresis), within a few intervals.
    wait_for(lambda: monitor.state("cloud") == "online", timeout=10)
    assert monitor.health["cloud"].probes - probes_before >= 2  # not on the first good probe
    r = ask(fresh)
    assert r.headers["x-hybrid-route"] == "cloud"
    with fresh.client() as c:
        assert 'hybrid_target_online{target="cloud"} 1.0' in c.get("/metrics").text


def test_probe_marks_offline_without_traffic_and_captive_portal_counts_as_offline(
    fresh: RunningGateway, cloud: FakeUpstream
):
    monitor = fresh.state.runtime.monitor
    wait_for(lambda: monitor.health["cloud"].probes >= 1)
    cloud.fault = Fault("captive", paths=("/models", "/chat/completions"))
    # Marked offline within about one probe interval (0.3 s) after the portal appears.
    waited = wait_for(lambda: monitor.state("cloud") == "offline", timeout=5)
    assert waited < 2.5  # a few probe intervals at most, even on a loaded box
    cloud.fault = None
    wait_for(lambda: monitor.state("cloud") == "online", timeout=5)


def test_single_blip_does_not_flap(fresh: RunningGateway, cloud: FakeUpstream):
    monitor = fresh.state.runtime.monitor
    cloud.once(Fault("status", status=500))
    cloud.once(Fault("status", status=500))
    r = ask(fresh)  # two failed attempts (1 retry), then local
    assert r.headers["x-hybrid-route"] == "local"
    assert monitor.state("cloud") == "online"  # 2 failures < failures_to_offline (3)
    assert ask(fresh).headers["x-hybrid-route"] == "cloud"


def test_retry_honours_short_retry_after(fresh: RunningGateway, cloud: FakeUpstream):
    cloud.once(Fault("status", status=429, retry_after="0.2"))
    t0 = time.monotonic()
    r = ask(fresh)
    assert r.headers["x-hybrid-route"] == "cloud"  # the retry succeeded
    assert time.monotonic() - t0 >= 0.2
    assert len(cloud.received) == 2


def test_admin_force_offline_and_back(fresh: RunningGateway, cloud: FakeUpstream):
    admin = {"authorization": "Bearer admin-secret"}
    with fresh.client() as c:
        r = c.post("/admin/connectivity", json={"target": "cloud", "force": "offline"}, headers=admin)
        assert r.status_code == 200 and r.json()["targets"]["cloud"] == "offline"
        r = ask(fresh)
        assert r.headers["x-hybrid-rule"] == "offline" and r.headers["x-hybrid-route"] == "local"
        assert cloud.received == []
        c.post("/admin/connectivity", json={"target": "cloud", "force": "auto"}, headers=admin)
        assert ask(fresh).headers["x-hybrid-route"] == "cloud"


def test_serve_offline_flag(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream):
    with run_gateway(write_policy(tmp_path / "p.yaml", cloud, local), force="offline") as gw:
        r = ask(gw)
        assert r.status_code == 200 and r.headers["x-hybrid-route"] == "local"
        assert r.headers["x-hybrid-connectivity"] == "offline"
    assert cloud.received == []


def test_cloud_without_key_is_never_contacted(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream):
    path = write_policy(tmp_path / "p.yaml", cloud, local, cloud_settings={"api_key": "${NO_SUCH_KEY_VAR:-}"})
    cloud.probes = 0
    with run_gateway(path) as gw:
        time.sleep(0.5)  # several probe intervals
        r = ask(gw)
        assert r.status_code == 200 and r.headers["x-hybrid-route"] == "local"
        # No key: `disabled` (never contacted), not `offline` (configured but unreachable).
        assert r.headers["x-hybrid-connectivity"] == "disabled"
    assert cloud.received == [] and cloud.probes == 0
