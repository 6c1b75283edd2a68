"""Issue #15, "Gateway behaviour": the defects a new user hit on the first day, each through a real
gateway on loopback (or the CLI as a user runs it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.features import DifficultyFinding, Features, SensitivityFinding
from gateway.policy.evaluate import decide
from gateway.policy.load import parse_policy
from tests.gateway.conftest import POLICY
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.policies import OFFLINE_LOCAL, policy_yaml, write_policy
from tests.support.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[2]
KEY = {"authorization": "Bearer k-app"}
ADMIN = {"authorization": "Bearer admin-secret"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}

RULES = """
clients:
  - {name: app, api_key: k-app}
connectivity: {probe_interval_s: 0.3, probe_timeout_s: 0.5, failures_to_offline: 3, successes_to_online: 2}
limits: {request_timeout_s: 30, classify_budget_ms: 5000}
""" + OFFLINE_LOCAL + """  - name: keep-home
    when: { header: { x-keep: home } }
    route: engine
    allow_pin: false
  - name: images-to-cloud
    when: { has_images: true, header: { x-images: cloud } }
    route: cloud
  - name: engine
    when: { header: { x-route: engine } }
    route: engine
    fallback: []
  - name: default
    route: local
"""


def _policy(cloud: FakeUpstream, local: FakeUpstream, rules: str = RULES, **cloud_settings: object) -> str:
    return policy_yaml(
        cloud.base_url, local.base_url,
        cloud={"timeout_s": 5, **cloud_settings},  # type: ignore[dict-item]
        local={"timeout_s": 5, "vision": False},
        more_targets={"engine": {"kind": "local", "engine": "local_engine", "model_path": "builtin:smollm2-135m",
                                 "default_max_tokens": 3}},
        rest=rules,
    )


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream,
       audit_path: Path) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(_policy(cloud, local))
    with run_gateway(path, audit_path=str(audit_path)) as running:
        yield running


def chat(gw: RunningGateway, messages: list, headers: dict | None = None, **body: object) -> httpx.Response:
    with gw.client() as c:
        return c.post("/v1/chat/completions", headers={**KEY, **(headers or {})},
                      json={"model": "auto", "messages": messages, **body})


def audit_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_text().splitlines() if line.strip()]


# 1. The README's admin example works as written (curl -d sends application/x-www-form-urlencoded).
def test_readme_admin_curl_example_is_accepted(gw: RunningGateway):
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"curl [^\n]*-d '(\{[^']*\})'[^\n]*\\\n\s*http://127\.0\.0\.1:8080(/admin/connectivity)", readme)
    assert m, "README's admin curl example not found"
    body, path = m.group(1), m.group(2)
    with gw.client() as c:
        r = c.post(path, content=body.encode(),
                   headers={**ADMIN, "content-type": "application/x-www-form-urlencoded"})  # what curl -d sends
        assert r.status_code == 200, r.text
        assert r.json()["targets"]["cloud"] == "offline"
        r = c.post(path, content=b'{"target": "cloud", "force": "auto"}', headers=ADMIN)  # no content type at all
        assert r.status_code == 200 and r.json()["targets"]["cloud"] == "online"
        r = c.post(path, content=b"target=cloud&force=offline", headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


# 2. Early errors carry the request id, and are counted and audited.
@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{not json", KEY, 400, "invalid_json"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}]}', {}, 401, "missing_api_key"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', KEY, 404, "model_not_found"),
    ],
)
def test_early_errors_carry_request_id_and_are_counted_and_audited(
    gw: RunningGateway, audit_path: Path, content: bytes, headers: dict, status: int, code: str
):
    def count() -> float:
        with gw.client() as c:
            text = c.get("/metrics").text
        m = re.search(rf'^hybrid_requests_total{{endpoint="/v1/chat/completions",route="-",rule="-",status="{status}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    before = count()
    rid = f"first-day-{code}"
    with gw.client() as c:
        r = c.post("/v1/chat/completions", content=content,
                   headers={**headers, "content-type": "application/json", "x-request-id": rid})
        assert r.status_code == status and r.json()["error"]["code"] == code
        assert r.headers["x-request-id"] == rid
        generated = c.post("/v1/chat/completions", content=content, headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    assert count() == before + 2
    line = next(rec for rec in audit_lines(audit_path) if rec["request_id"] == rid)
    assert line["status"] == status and line["rule"] == "-" and line["target"] == "-" and line["error"] == code


def test_other_routes_errors_carry_request_id(gw: RunningGateway):
    with gw.client() as c:
        r = c.get("/v1/no-such-route", headers={"x-request-id": "abc-1"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "abc-1"
        r = c.get("/v1/models")  # no key
        assert r.status_code == 401 and r.headers["x-request-id"]


# 3. Images: said when dropped, routable by a rule, refusable by policy.
def test_images_dropped_for_a_target_without_vision_are_reported(gw: RunningGateway, local: FakeUpstream):
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]}]
    r = chat(gw, messages)
    assert r.status_code == 200 and r.headers["x-hybrid-route"] == "local"
    assert "local cannot take images: 1 image part dropped" in r.headers["x-hybrid-warning"]
    assert local.received[-1]["messages"][0]["content"] == [{"type": "text", "text": "what is this?"}]
    r = chat(gw, messages, {"x-route": "engine"}, max_tokens=2)  # the built-in engine: text only by default
    assert r.status_code == 200 and r.headers["x-hybrid-route"] == "engine"
    assert "engine cannot take images: 1 image part dropped" in r.headers["x-hybrid-warning"]


def test_a_rule_routes_images_to_a_target_that_takes_them(gw: RunningGateway, cloud: FakeUpstream):
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe"}, IMAGE]}]
    r = chat(gw, messages, {"x-images": "cloud"})
    assert r.headers["x-hybrid-rule"] == "images-to-cloud" and r.headers["x-hybrid-route"] == "cloud"
    assert "x-hybrid-warning" not in r.headers
    assert cloud.received[-1]["messages"][0]["content"][1] == IMAGE
    r = chat(gw, [{"role": "user", "content": "no picture"}], {"x-images": "cloud"})
    assert r.headers["x-hybrid-rule"] == "default"


def test_images_rejected_when_the_policy_says_so(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream):
    text = POLICY.replace("defaults:\n  fallback: [local]", "defaults:\n  fallback: [local]\n  images: reject")
    assert "images: reject" in text
    path = tmp_path / "p.yaml"
    write_policy(path, cloud, local, rest=text, cloud_settings={}, local_settings={"vision": False})
    with run_gateway(path) as gw1, gw1.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"}, IMAGE]}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "images_not_supported" and "images" in err["message"]
        assert r.headers["x-hybrid-rule"] == "default"
    assert local.received == []


def test_vision_defaults_cloud_and_local_server_yes_engine_no(cloud: FakeUpstream, local: FakeUpstream):
    policy = parse_policy(_policy(cloud, local).replace("    vision: false\n", ""), "p.yaml")
    assert [policy.takes_images(t) for t in ("cloud", "local", "engine")] == [True, True, False]


# 4. Null content only for an assistant message with tool calls.
def test_null_content_is_rejected_except_for_assistant_tool_calls(gw: RunningGateway):
    r = chat(gw, [{"role": "user", "content": None}])
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_value" and err["param"] == "messages.0" and "content" in err["message"]
    assert "Value error" not in err["message"]
    call = {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    r = chat(gw, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "c0", "content": "ok"}])
    assert r.status_code == 200


# 5. The model that answered, in JSON and every chunk; a refused pin says so.
def test_model_is_the_one_that_answered_and_a_refused_pin_says_so(gw: RunningGateway):
    r = chat(gw, [{"role": "user", "content": "hi"}], {"x-keep": "home"}, model="cloud", max_tokens=2)
    assert r.status_code == 200 and r.headers["x-hybrid-route"] == "engine"
    assert r.json()["model"] == "smollm2-135m"
    assert r.headers["x-hybrid-pin-refused"] == "cloud"
    with gw.client() as c, c.stream("POST", "/v1/chat/completions", headers={**KEY, "x-keep": "home"}, json={
            "model": "cloud", "stream": True, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}) as s:
        assert s.headers["x-hybrid-pin-refused"] == "cloud"
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"smollm2-135m"}
    r = chat(gw, [{"role": "user", "content": "hi"}], model="cloud")  # a pin that is honoured
    assert r.json()["model"] == "cloud-model" and "x-hybrid-pin-refused" not in r.headers


# 6. No key: `disabled`, not `offline`, everywhere; rules tell them apart.
def test_keyless_cloud_is_disabled_not_offline(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream):
    rules = """
rules:
  - name: no-cloud-key
    when: { connectivity: disabled }
    route: local
  - name: offline
    when: { connectivity: offline }
    route: local
  - name: default
    route: cloud
"""
    path = tmp_path / "p.yaml"
    write_policy(path, cloud, local, rest=rules, cloud_settings={"api_key": "${NO_SUCH_KEY_VAR:-}"}, local_settings={})
    with run_gateway(path) as gw1, gw1.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
        assert r.headers["x-hybrid-connectivity"] == "disabled" and r.headers["x-hybrid-rule"] == "no-cloud-key"
        assert c.get("/readyz").json()["targets"]["cloud"] == "disabled"
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["cloud"]["hybrid"]["state"] == "disabled"
        r = c.post("/admin/connectivity", json={"force": "offline"}, headers=ADMIN)  # testing offline mode
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
        assert r.headers["x-hybrid-connectivity"] == "offline" and r.headers["x-hybrid-rule"] == "offline"
    assert cloud.received == []


def _features(**connectivity: str) -> Features:
    return Features(model="auto", client=None, connectivity=connectivity, sensitivity=SensitivityFinding(),
                    difficulty=DifficultyFinding(), prompt_tokens=1, has_tools=False)


def test_overall_connectivity_and_rules_with_several_values():
    assert _features(a="online", b="offline").overall_connectivity == "online"
    assert _features(a="disabled", b="offline").overall_connectivity == "offline"
    assert _features(a="disabled", b="disabled").overall_connectivity == "disabled"
    assert _features().overall_connectivity == "disabled"  # a policy without cloud targets
    policy = parse_policy("""version: 1
targets:
  c: {kind: cloud, model: openai/x}
  l: {kind: local, model: openai/y, api_base: "http://127.0.0.1:1/v1"}
rules:
  - {name: no-cloud, when: {connectivity: [offline, disabled]}, route: l}
  - {name: default, route: c}
""", "p.yaml")
    assert decide(_features(c="disabled"), policy).rule == "no-cloud"
    assert decide(_features(c="offline"), policy).rule == "no-cloud"
    assert decide(_features(c="online"), policy).rule == "default"


def test_default_policy_without_a_key_answers_with_a_named_rule():
    result = CliRunner().invoke(main, ["explain", "--policy", str(ROOT / "policies/default.yaml"), "hello"],
                                env={"CLOUD_API_KEY": ""})
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["decision"]["rule"] == "no-cloud-key" and out["decision"]["target"] == "local"
    assert out["features"]["connectivity"] == "disabled" and out["features"]["targets"] == {"cloud": "disabled"}


def test_explain_prints_only_its_json_on_stdout_and_logs_on_stderr():
    # With a key, presidio loads and logs `privacy_analyzer_ready`: that line belongs on stderr.
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "explain", "--policy",
                          str(ROOT / "policies/default.yaml"), "My name is John Smith."],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "CLOUD_API_KEY": "sk-test"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["decision"]["rule"]
    assert "privacy_analyzer_ready" in out.stderr


# 7. explain: the server's connectivity view, only what the decision needs, or ask the server.
def test_explain_loads_only_what_the_decision_needs():
    code = (
        "import sys, json\n"
        "from click.testing import CliRunner\n"
        "from gateway.cli import main\n"
        "r = CliRunner().invoke(main, ['explain', 'hello'], env={'CLOUD_API_KEY': ''})\n"
        "out = json.loads(r.output)\n"
        "print(json.dumps({'rule': out['decision']['rule'], 'sensitivity': out['features']['sensitivity']['level'],"
        " 'modules': [m for m in ('presidio_analyzer', 'spacy', 'litellm') if m in sys.modules]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"rule": "no-cloud-key", "sensitivity": "unscored", "modules": []}


def test_explain_asks_a_running_server(gw: RunningGateway):
    args = ["explain", "--server", gw.base_url, "--api-key", "k-app", "--header", "x-keep=home", "--model", "cloud",
            "hi"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["decision"]["rule"] == "keep-home" and out["decision"]["pin_refused"] == "cloud"
    result = CliRunner().invoke(main, ["explain", "--server", gw.base_url, "hi"])  # no key
    assert result.exit_code != 0 and "401" in result.output and "Traceback" not in result.output


# 8. `serve --offline`: not one packet to the cloud, probes included.
def test_serve_offline_sends_nothing_to_the_cloud(tmp_path: Path, local: FakeUpstream):
    rules = """
connectivity: {probe_interval_s: 0.2, probe_timeout_s: 0.5, failures_to_offline: 3, successes_to_online: 2}
rules:
  - name: to-cloud
    when: { header: { x-route: cloud } }
    route: cloud
    fallback: []
  - name: default
    route: local
"""
    with FakeUpstream(model="cloud-model", name="cloud-offline") as fresh_cloud:
        path = tmp_path / "p.yaml"
        path.write_text(policy_yaml(fresh_cloud.base_url, local.base_url, cloud={}, local={}, rest=rules))
        with run_gateway(path, force="offline") as gw1, gw1.client() as c:
            time.sleep(2.0)  # ten probe intervals
            r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200 and r.headers["x-hybrid-route"] == "local"
            r = c.post("/v1/chat/completions", headers={"x-route": "cloud"},
                       json={"model": "auto", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 503
        assert fresh_cloud.probes == 0 and fresh_cloud.received == []
        assert fresh_cloud._server is not None and fresh_cloud._server.accepted == 0


# 9. One health check: the container's HEALTHCHECK is what the docs tell load balancers to use.
def test_container_healthcheck_is_the_documented_readiness_endpoint():
    docker = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^HEALTHCHECK .*?http://127\.0\.0\.1:8080(/\w+)", docker, re.M | re.S)
    assert m and m.group(1) == "/readyz"
    ops = (ROOT / "docs/operations.md").read_text()
    assert "HEALTHCHECK` on `/readyz`" in ops and "Use `/readyz` for the LB's health check" in ops
