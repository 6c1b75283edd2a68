"""Prompt text in the audit log: absent by default, placeholders only when `redacted`, raw on request."""

from __future__ import annotations

import textwrap
from pathlib import Path

import orjson
import pytest

from tests.support.gateway import run_gateway
from tests.support.upstream import FakeUpstream

EMAIL = "jonas.meyer@example.org"
POLICY = """
version: 1
targets:
  local: {{kind: local, model: openai/local-model, api_base: "{local}"}}
connectivity: {{probe_interval_s: 30}}
privacy: {{nlp_model: none}}
difficulty: {{method: heuristic}}
rules:
  - {{name: all, route: local}}
"""


@pytest.mark.parametrize("mode", ["off", "redacted", "raw"])
def test_audit_prompt_text(tmp_path: Path, local: FakeUpstream, mode: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(textwrap.dedent(POLICY).format(local=local.base_url))
    audit = tmp_path / "audit.jsonl"
    with run_gateway(policy, audit_path=str(audit), audit_prompts=mode) as gw, gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": f"write to {EMAIL} today"}]})
        assert r.status_code == 200
    line = orjson.loads(audit.read_text().splitlines()[-1])
    assert line["entities"] == {"EMAIL_ADDRESS": 1}
    if mode == "off":
        assert "messages" not in line and EMAIL not in audit.read_text()
    elif mode == "redacted":
        assert line["prompt_text"] == "redacted"
        assert line["messages"][1]["content"] == "write to <EMAIL_ADDRESS_1> today"
        assert EMAIL not in audit.read_text()
    else:
        assert line["messages"][1]["content"] == f"write to {EMAIL} today"
