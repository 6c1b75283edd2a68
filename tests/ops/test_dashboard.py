"""The live dashboard through the real server: the page, its own assets, and numbers that move.

The data feed and assets are checked over HTTP; the page itself is rendered by a real headless
Chromium (tests/ops/browser.py; installed by `make system-tools`, the test skips without one) and
the numbers it shows are compared with what the gateway served.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import POLICY, write_policy
from tests.ops.browser import find_browser, parse_dom, png_pixels, render
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


# Planted in a prompt: none of it may reach the page (the dashboard holds counts and policy names only).
PII = ("Maria Gonzalez", "maria.gonzalez@example.com", "212-555-0142")


def js_fmt(n: float) -> str:
    """dashboard.js's `fmt`."""
    return f"{n / 1000:.1f}k" if n >= 1000 else str(int(n + 0.5))


def js_top(counts: dict[str, float], n: int = 3) -> str:
    """dashboard.js's `top`: the n largest, stable for ties like Array.prototype.sort."""
    best = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {js_fmt(v)}" for k, v in best) or "none"


@pytest.mark.slow
def test_page_rendered_in_headless_chromium_shows_the_served_numbers(
    gw: RunningGateway, upstreams: tuple[FakeUpstream, FakeUpstream], tmp_path: Path
) -> None:
    browser = find_browser()
    if browser is None:
        pytest.skip("no headless Chromium (chromium-headless-shell / chromium): run `make system-tools` as root, "
                    "or apt-get install chromium-headless-shell")
    cloud, _ = upstreams
    with gw.client() as c:
        for i in range(2):
            assert ask(c, f"browser test {i}", stream=bool(i)).status_code == 200
        r = ask(c, f"Please ask {PII[0]} ({PII[1]}, {PII[2]}) to call back", {"x-route": "cloud"})
        assert r.status_code == 200 and int(r.headers["x-hybrid-redactions"]) >= 2
        cloud.fault = Fault("status", status=503)
        try:
            r = ask(c, "fall back for the browser", {"x-route": "cloud"})
        finally:
            cloud.fault = None
        assert r.headers["x-hybrid-fallback"].startswith("cloud->local")
        served = c.get("/dashboard/data").json()
        page = render(browser, f"{gw.base_url}/dashboard", tmp_path)
        # No chat traffic while the page was open, so the page must show exactly these numbers.
        after = c.get("/dashboard/data").json()
    assert after["requests"] == served["requests"] and after["fallbacks"] == served["fallbacks"]

    errors = [line for line in page.stderr.splitlines() if ":CONSOLE" in line and "Uncaught" in line]
    assert not errors, errors  # a script error leaves the page at its placeholders
    dom = parse_dom(page.dom)
    text = dom.text
    # The script ran, polled more than once in virtual time (rate needs two polls) and rendered.
    assert int(dom.body.get("data-updates", "0")) >= 2, page.stderr[-2000:]
    assert text["status"].startswith("live · updated"), text["status"]
    assert text["rate"] == "0.0 req/s"

    req = served["requests"]
    local, cloud_n = req["by_kind"].get("local", 0), req["by_kind"].get("cloud", 0)
    assert local >= 3 and cloud_n >= 1 and served["fallbacks"]["total"] >= 1 and served["redactions"]["total"] >= 2
    assert text["total"] == js_fmt(req["total"])
    assert text["local-share"] == f"{int(100 * local / (local + cloud_n) + 0.5)}%"
    assert text["kind-counts"] == f"local {js_fmt(local)} · cloud {js_fmt(cloud_n)}"
    assert text["fallbacks"] == js_fmt(served["fallbacks"]["total"])
    assert text["fallback-reasons"] == js_top(served["fallbacks"]["by_reason"])
    assert text["redactions"] == js_fmt(served["redactions"]["total"])
    assert text["redaction-types"] == js_top(served["redactions"]["by_entity"])
    assert "EMAIL_ADDRESS" in text["redaction-types"]
    assert text["policy"] == served["policy"]

    routes = {row[0]: row[1:] for row in dom.rows["routes"]}
    assert routes == {route: [served["targets"].get(route, "none"), js_fmt(n),
                              f"{served['mean_latency_ms'][route]:.1f}"]
                      for route, n in req["by_route"].items()}
    conn = {row[0]: row[1] for row in dom.rows["connectivity"]}
    assert conn == {name: c["state"] for name, c in served["connectivity"].items()} and conn["cloud"] == "online"
    assert dom.rows["engines"] == [["–", "no in-process engine", ""]]

    lowered = page.dom.lower()
    assert not [p for p in PII if p.lower() in lowered], "PII reached the dashboard page"

    # The screenshot is the rendered page: right size, many colours (text antialiasing), and the
    # legend swatches the script draws in each route's colour (dashboard.js COLORS[0], [1]).
    width, height, colours = png_pixels(page.screenshot)
    assert (width, height) == (1280, 1000)
    assert len(colours) > 50, len(colours)
    assert {(0x2F, 0x6F, 0xDE), (0x1A, 0x9C, 0x5B)} <= colours
