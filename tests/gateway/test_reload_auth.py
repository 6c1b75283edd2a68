"""Policy hot reload (good and bad edits) and client authentication."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from tests.gateway.conftest import write_policy
from tests.support.gateway import run_gateway
from tests.support.upstream import FakeUpstream


def ask(base_url: str, **headers) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", headers=headers, trust_env=False, timeout=10,
                      json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})


def test_hot_reload_good_then_bad_keeps_last_good(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream):
    path = write_policy(tmp_path / "p.yaml", cloud, local)
    with run_gateway(path, watch=True) as gw:
        assert ask(gw.base_url).headers["x-hybrid-route"] == "local"
        # A valid edit: the default rule now goes to the cloud. Written via rename, as editors do.
        text = path.read_text().replace("  - name: default\n    route: local", "  - name: default\n    route: cloud")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        t0 = time.monotonic()
        while ask(gw.base_url).headers["x-hybrid-route"] != "cloud":
            assert time.monotonic() - t0 < 3, "valid edit not applied in time"
            time.sleep(0.1)
        # An invalid edit: logged, metric counted, last good policy stays.
        path.write_text(text.replace("route: cloud", "route: nowhere"))
        t0 = time.monotonic()
        while gw.state.policy_error is None:
            assert time.monotonic() - t0 < 3
            time.sleep(0.1)
        assert "p.yaml:" in gw.state.policy_error and "unknown target 'nowhere'" in gw.state.policy_error
        assert ask(gw.base_url).headers["x-hybrid-route"] == "cloud"
        metrics = httpx.get(gw.base_url + "/metrics", trust_env=False).text
        assert 'hybrid_policy_reloads_total{result="invalid"}' in metrics
        assert httpx.get(gw.base_url + "/readyz", trust_env=False).json()["policy_error"]


def test_reload_does_not_drop_in_flight_requests(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream):
    import threading

    path = write_policy(tmp_path / "p.yaml", cloud, local)
    local.chunk_delay = 0.05  # a slow stream that spans the reload
    with run_gateway(path) as gw:
        result: dict = {}

        def slow() -> None:
            with httpx.stream("POST", gw.base_url + "/v1/chat/completions", trust_env=False, timeout=10,
                              json={"model": "auto", "stream": True,
                                    "messages": [{"role": "user", "content": "x"}]}) as r:
                result["body"] = r.read().decode()

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.1)
        path.write_text(path.read_text().replace("probe_interval_s: 0.3", "probe_interval_s: 0.4"))
        assert gw.call(gw.state.reload) is True
        t.join(10)
        assert result["body"].rstrip().endswith("data: [DONE]")
        assert "local answer"[:4] in result["body"]


def test_clients_need_valid_keys(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream):
    path = write_policy(tmp_path / "p.yaml", cloud, local)
    path.write_text(path.read_text().replace(
        "limits:", "clients:\n  - {name: app-one, api_key: key-one}\n  - {name: vip-two, api_key: key-two}\nlimits:"
    ).replace("  - name: to-cloud\n", "  - name: vip\n    when: { client: vip-* }\n    route: cloud\n  - name: to-cloud\n"))
    with run_gateway(path) as gw:
        r = ask(gw.base_url)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = ask(gw.base_url, authorization="Bearer wrong")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert ask(gw.base_url, authorization="Bearer key-one").headers["x-hybrid-route"] == "local"
        assert ask(gw.base_url, authorization="Bearer key-two").headers["x-hybrid-route"] == "cloud"
        assert httpx.get(gw.base_url + "/v1/models", trust_env=False).status_code == 401
