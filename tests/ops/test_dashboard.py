"""The live dashboard through the real server: the page, its own assets, and numbers that move.

Headless-Chromium rendering is not tested here: Debian `chromium` is not installed on this
machine (see docs/operations.md); the page's data feed and assets are checked over HTTP instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import POLICY, write_policy
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, Fault

ADMIN = {"authorization": "Bearer admin-secret"}
# The shared test policy, with redaction on the cloud rule and the cheap difficulty heuristic.
DASH_POLICY = POLICY.replace("    route: cloud\n  - name: tools-cloud", "    route: cloud\n    redact: true\n  - name: tools-cloud") \
    + "difficulty:\n  method: heuristic\n"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with FakeUpstream(model="cloud-model", name="cloud") as cloud, \
            FakeUpstream(model="local-model", name="local", reply=lambda b: "local answer") as local:
        yield cloud, local


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[FakeUpstream, FakeUpstream]) -> Iterator[RunningGateway]:
    cloud, local = upstreams
    with run_gateway(write_policy(tmp_path_factory.mktemp("dash") / "p.yaml", cloud, local, DASH_POLICY)) as running:
        yield running


def ask(c: httpx.Client, text: str, headers: dict[str, str] | None = None, stream: bool = False) -> httpx.Response:
    return c.post("/v1/chat/completions", headers=headers or {},
                  json={"model": "auto", "stream": stream, "messages": [{"role": "user", "content": text}]})


def test_page_and_assets_are_served_from_our_files(gw: RunningGateway) -> None:
    with gw.client() as c:
        page = c.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        # Offline machine: everything the page loads must come from the gateway itself.
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert assets and not [a for a in assets if re.match(r"(https?:)?//", a)], assets
        for asset in assets:
            r = c.get(asset)
            assert r.status_code == 200, asset
        js = c.get("/dashboard/assets/dashboard.js")
        assert js.headers["content-type"].startswith("text/javascript")
        assert "/dashboard/data" in js.text and "http" not in js.text.replace("HTTP ", "")
        bad = c.get("/dashboard/assets/..%2F..%2Fstate.py")
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "not_found"


def test_data_follows_traffic_fallbacks_redactions_and_connectivity(
    gw: RunningGateway, upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    cloud, _ = upstreams
    with gw.client() as c:
        before = c.get("/dashboard/data").json()
        assert before["targets"] == {"cloud": "cloud", "local": "local"}
        assert before["connectivity"]["cloud"]["state"] == "online"

        for i in range(3):
            assert ask(c, f"hello {i}", stream=bool(i % 2)).status_code == 200  # default rule: local
        r = ask(c, "Please email maria.gonzalez@example.com about it", {"x-route": "cloud"})
        assert r.status_code == 200 and r.headers["x-hybrid-route"] == "cloud"
        redacted = int(r.headers["x-hybrid-redactions"])
        cloud.fault = Fault("status", status=502)
        try:
            r = ask(c, "fall back please", {"x-route": "cloud"})
        finally:
            cloud.fault = None
        assert r.headers["x-hybrid-route"] == "local" and r.headers["x-hybrid-fallback"].startswith("cloud->local")

        after = c.get("/dashboard/data").json()
        req_b, req_a = before["requests"], after["requests"]
        assert req_a["total"] - req_b["total"] == 5
        assert req_a["by_kind"].get("local", 0) - req_b["by_kind"].get("local", 0) == 4
        assert req_a["by_kind"].get("cloud", 0) - req_b["by_kind"].get("cloud", 0) == 1
        assert after["fallbacks"]["total"] - before["fallbacks"]["total"] == 1
        assert after["fallbacks"]["by_path"]["cloud/local"] >= 1
        assert redacted >= 1
        assert after["redactions"]["total"] - before["redactions"]["total"] == redacted
        assert after["redactions"]["by_entity"].get("EMAIL_ADDRESS", 0) >= 1
        assert after["mean_latency_ms"]["local"] > 0
        # The same numbers as /metrics: one registry behind both.
        metrics = c.get("/metrics").text
        total = sum(float(m) for m in re.findall(r'^hybrid_requests_total\{[^}]*\} (\S+)$', metrics, re.M))
        assert total == req_a["total"]

        c.post("/admin/connectivity", json={"target": "cloud", "force": "offline"}, headers=ADMIN)
        try:
            conn = c.get("/dashboard/data").json()["connectivity"]["cloud"]
            assert conn["state"] == "offline" and conn["forced"] is True
        finally:
            c.post("/admin/connectivity", json={"target": "cloud", "force": "auto"}, headers=ADMIN)
        assert c.get("/dashboard/data").json()["connectivity"]["cloud"]["state"] == "online"


def test_dashboard_source_has_no_remote_references() -> None:
    static = Path(__file__).resolve().parents[2] / "gateway" / "static"
    for f in static.glob("dashboard.*"):
        assert not re.search(r"https?://", f.read_text()), f"{f.name} references a remote URL"
