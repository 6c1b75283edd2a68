"""`POST /v1/route/explain` and `hybrid-gateway explain` show the difficulty's reasons in words."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from click.testing import CliRunner

from tests.support.gateway import run_gateway
from tests.support.policies import policy_yaml
from tests.support.upstream import FakeUpstream

RULES = """
privacy:
  enabled: false
difficulty:
  method: knn
rules:
  - name: hard-to-cloud
    when: { difficulty: { at_least: hard } }
    route: cloud
  - name: default
    route: local
"""


def test_the_server_explains_in_words(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(cloud.base_url, local.base_url, cloud={"timeout_s": 5}, local={"timeout_s": 5}, rest=RULES))
    with run_gateway(policy) as gw, httpx.Client(base_url=gw.base_url, trust_env=False, timeout=30) as c:
        def explain(text: str) -> dict:
            r = c.post("/v1/route/explain", json={"model": "auto", "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200, r.text
            return r.json()

        proof = explain("Prove that √2 is irrational")
        phone = explain("Call me back at +1 415-555-0199 tomorrow.")
    d = proof["features"]["difficulty"]
    assert d["level"] == "hard" and d["reasons"][0] == "asks for a proof"
    assert proof["decision"]["rule"] == "hard-to-cloud"
    d = phone["features"]["difficulty"]
    assert d["level"] == "easy" and d["reasons"] == ["digits are a phone number, id, date or address, not maths"]
    assert phone["decision"]["rule"] == "default"
    assert "415" not in json.dumps(d)  # reasons and evidence never carry the prompt's text
    assert cloud.received == [] and local.received == []


def test_the_cli_explains_in_words(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream) -> None:
    from gateway.cli import main

    # privacy off and a rule that reads difficulty: only the difficulty classifier is loaded
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(cloud.base_url, local.base_url, cloud={"timeout_s": 5}, local={"timeout_s": 5}, rest=RULES))
    res = CliRunner().invoke(main, ["explain", "--policy", str(policy), "What is the capital of France?"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)["features"]["difficulty"]
    assert d["level"] == "easy" and d["reasons"] == ["short factual question"]
