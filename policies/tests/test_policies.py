"""The policies we ship: they validate, the schema is current, the cases pass, broken ones point at the line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main, policy_json_schema
from gateway.policy.load import PolicyError, load_policy

HERE = Path(__file__).resolve().parent
POLICIES = HERE.parent
SHIPPED = [POLICIES / "default.yaml", *sorted((POLICIES / "examples").glob("*.yaml"))]
BROKEN = sorted((HERE / "broken").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_validate(path: Path):
    policy = load_policy(path, env={})
    assert policy.rules and policy.targets
    assert len(list((POLICIES / "examples").glob("*.yaml"))) >= 3


def test_schema_json_is_current():
    committed = json.loads((POLICIES / "schema.json").read_text())
    assert committed == json.loads(json.dumps(policy_json_schema())), (
        "policies/schema.json is stale: run `hybrid-gateway policy schema > policies/schema.json`"
    )


def test_schema_accepts_shipped_policies():
    import jsonschema
    import yaml

    schema = json.loads((POLICIES / "schema.json").read_text())
    for path in SHIPPED:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.name)
def test_broken_policy_reports_file_line_col(path: Path):
    m = re.match(r"# expect: (\d+):(\d+) (.+)", path.read_text().splitlines()[0])
    assert m, f"{path.name} needs a first line '# expect: LINE:COL message'"
    line, col, text = m.groups()
    result = CliRunner().invoke(main, ["policy", "check", str(path)], env={"HYBRID_TEST_UNSET_VAR": None})
    assert result.exit_code == 1
    first = result.output.splitlines()[0]
    assert first.startswith(f"{path}:{line}:{col}: "), first
    assert text in first
    assert "Traceback" not in result.output


def test_missing_file_is_a_located_error(tmp_path: Path):
    with pytest.raises(PolicyError) as exc:
        load_policy(tmp_path / "nope.yaml")
    assert str(exc.value).endswith("nope.yaml:1:1: policy file not found")


def test_env_interpolation_and_defaults(tmp_path: Path):
    p = tmp_path / "p.yaml"
    p.write_text(
        "version: 1\ntargets:\n  c:\n    kind: cloud\n    model: ${M:-openai/x}\n    api_key: ${K}\n"
        "    timeout_s: ${T:-7}\nrules:\n  - {name: d, route: c}\n"
    )
    policy = load_policy(p, env={"K": "secret"})
    assert policy.targets["c"].model == "openai/x"
    assert policy.targets["c"].api_key == "secret"
    assert policy.targets["c"].timeout_s == 7.0


def test_shipped_cases_pass_through_cli():
    result = CliRunner().invoke(
        main, ["policy", "test", str(POLICIES / "default.yaml"), str(HERE / "default_cases.yaml")],
        env={"CLOUD_API_KEY": ""},
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"^\d+ passed, 0 failed$", result.output, re.M)


def test_failing_case_exits_non_zero(tmp_path: Path):
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n  - name: wrong on purpose\n    prompt: hi\n    expect: {target: cloud}\n")
    result = CliRunner().invoke(main, ["policy", "test", str(POLICIES / "default.yaml"), str(cases)])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "target: expected 'cloud', got 'local'" in result.output


def test_explain_cli_prints_decision_json():
    result = CliRunner().invoke(main, ["explain", "--policy", str(POLICIES / "default.yaml"), "--offline", "hello"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["decision"]["rule"] == "offline" and out["decision"]["target"] == "local"
    assert out["features"]["connectivity"] == "offline"
