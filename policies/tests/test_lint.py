"""`hybrid-gateway policy check` warns about valid but dangerous or broken policies (gateway/policy/lint.py).

Each file in warn/ starts with `# expect: LINE text` lines: every warning the check prints must be
one of them, at that line, and each of them must be printed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import get_args

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.policy.lint import lint, probe_model_path
from gateway.policy.load import PolicyError, parse_policy_source
from gateway.policy.model import When

HERE = Path(__file__).resolve().parent
WARN = sorted((HERE / "warn").glob("*.yaml"))
SHIPPED = [HERE.parent / "default.yaml", *sorted((HERE.parent / "examples").glob("*.yaml"))]

TARGETS = """version: 1
targets:
  cloud: {kind: cloud, model: openai/gpt-4o-mini, api_base: "http://127.0.0.1:9/v1", api_key: sk-test}
  local: {kind: local, engine: local_engine, model_path: "builtin:smollm2-135m"}
"""


def messages(rules_yaml: str, head: str = TARGETS) -> list[str]:
    policy, source = parse_policy_source(head + rules_yaml, "p.yaml", env={})
    return [str(w) for w in lint(policy, source, probe=lambda _: None)]


@pytest.mark.parametrize("path", WARN, ids=lambda p: p.name)
def test_warn_policy_prints_each_expected_warning_at_its_line(path: Path):
    expected = [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^# expect: (\d+) (.+)$", path.read_text(), re.M)]
    assert expected, f"{path.name} needs '# expect: LINE text' lines"
    env = {"WARN_DIR": str(path.parent)}
    result = CliRunner().invoke(main, ["policy", "check", str(path)], env=env)
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.output.splitlines() if ": warning: " in ln]
    for line, text in expected:
        assert any(w.startswith(f"{path}:{line}: warning: ") and text in w for w in warnings), (line, text, warnings)
    for w in warnings:
        assert any(w.startswith(f"{path}:{line}: warning: ") and text in w for line, text in expected), w
    assert "Traceback" not in result.output
    strict = CliRunner().invoke(main, ["policy", "check", "--strict", str(path)], env=env)
    assert strict.exit_code == 1


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_have_no_warnings(path: Path):
    result = CliRunner().invoke(main, ["policy", "check", "--strict", str(path)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output


# ----------------------------------------------------------------------------- high sensitivity to cloud


def test_a_rule_that_cannot_see_high_sensitivity_is_not_flagged():
    assert messages("""rules:
  - {name: low-to-cloud, when: {sensitivity: low}, route: cloud}
  - {name: default, route: local, allow_pin: false}
""") == []


def test_redacting_or_guarded_rules_are_not_flagged():
    assert messages("""rules:
  - {name: hard, when: {difficulty: hard}, route: cloud, redact: true}
  - {name: default, route: local, fallback: [cloud], redact: true}
""") == []
    # A guard split across rules still takes every high-sensitivity request before `to-cloud`.
    assert messages("""rules:
  - {name: offline, when: {connectivity: offline}, route: local}
  - {name: secrets, when: {sensitivity: {at_least: medium}}, route: local}
  - {name: to-cloud, route: cloud}
""") == []


def test_a_guard_narrower_than_the_rule_does_not_shadow_it():
    guarded = """rules:
  - {name: secrets, when: {sensitivity: high, model: "gpt-4o"}, route: local}
  - {name: to-cloud, when: {model: "%s"}, route: cloud}
  - {name: default, route: local, allow_pin: false}
"""
    assert messages(guarded % "gpt-4o") == []  # the same glob: the guard takes them all
    found = messages(guarded % "gpt-*")  # gpt-4o-mini with secrets reaches to-cloud
    assert len(found) == 1 and "rule 'to-cloud' can send sensitivity: high" in found[0]
    assert found[0].startswith("p.yaml:7: warning: ")


def test_a_high_only_rule_that_only_runs_offline_cannot_reach_the_cloud():
    assert messages("""rules:
  - {name: secrets, when: {sensitivity: high, connectivity: offline}, route: local, fallback: [cloud]}
  - {name: guard, when: {sensitivity: high}, route: local}
  - {name: default, route: local}
""") == []


def test_privacy_disabled_means_no_request_is_high():
    assert messages("""privacy: {enabled: false}
rules:
  - {name: all, route: cloud}
""") == []


# ----------------------------------------------------------------------------- connectivity, catch-all


def test_connectivity_lists_without_online_routing_to_cloud_are_flagged():
    states = [s for s in get_args(get_args(When.model_fields["connectivity"].annotation)[0]) if s != "online"]
    cond = states[0] if len(states) == 1 else f"[{', '.join(states)}]"  # a list where the model takes one
    found = messages(f"""rules:
  - {{name: no-net, when: {{connectivity: {cond}}}, route: cloud, redact: true}}
  - {{name: secrets, when: {{sensitivity: high}}, route: local}}
  - {{name: default, route: local}}
""")
    assert len(found) == 1 and f"only matches when connectivity is {' or '.join(states)}" in found[0]


def test_rules_covering_every_connectivity_state_are_a_catch_all():
    # The states come from the policy model: a new one makes such a policy warn again.
    states = get_args(get_args(When.model_fields["connectivity"].annotation)[0])
    rules = "".join(f"  - {{name: r-{s}, when: {{connectivity: {s}}}, route: local}}\n" for s in states)
    assert messages("rules:\n" + rules) == []
    found = messages("rules:\n" + "".join(rules.splitlines(keepends=True)[:-1]))
    assert len(found) == 1 and f"no catch-all rule: a request no rule matches (connectivity: {states[-1]})" in found[0]


def test_a_rule_on_a_glob_is_not_a_catch_all():
    found = messages("""rules:
  - {name: only-gpt, when: {model: "gpt-*"}, route: local, allow_pin: false}
""")
    assert len(found) == 1 and "no catch-all rule" in found[0] and found[0].startswith("p.yaml:5: warning: ")


# ----------------------------------------------------------------------------- YAML retyping


@pytest.mark.parametrize(("scalar", "says"), [
    ("no", "YAML read `no` as a boolean; quote it"),
    ("off", "YAML read `off` as a boolean; quote it"),
    ("1.10", "YAML read `1.10` as a number (1.1); quote it"),
    ("012", "YAML read `012` as an integer (10); quote it"),
])
def test_a_retyped_scalar_where_a_string_is_wanted_says_so(scalar: str, says: str):
    with pytest.raises(PolicyError) as exc:
        parse_policy_source(TARGETS + f"""rules:
  - {{name: default, block: {{message: {scalar}}}}}
""", "p.yaml", env={})
    (problem,) = exc.value.problems
    assert (problem.line, problem.col) == (6, 29) and says in problem.message, problem


def test_a_retyped_literal_says_so_and_quoting_fixes_it():
    body = """rules:
  - {name: default, when: {connectivity: %s}, route: local}
"""
    with pytest.raises(PolicyError) as exc:
        parse_policy_source(TARGETS + body % "off", "p.yaml", env={})
    assert "YAML read `off` as a boolean; quote it" in str(exc.value)
    with pytest.raises(PolicyError) as exc:
        parse_policy_source(TARGETS + body % '"off"', "p.yaml", env={})
    assert "YAML read" not in str(exc.value)  # quoted: the plain "not one of" error only


# ----------------------------------------------------------------------------- model files


def test_model_probe_reads_headers_only(tmp_path: Path):
    from local_engine.engine import resolve

    assert probe_model_path("builtin:smollm2-135m") is None
    assert "unknown built-in model" in (probe_model_path("builtin:nope") or "")
    truncated = tmp_path / "t.gguf"
    with open(resolve("builtin:smollm2-135m"), "rb") as f:
        truncated.write_bytes(f.read(4096))
    assert "corrupt or truncated GGUF header" in (probe_model_path(str(truncated)) or "")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert "JSONDecodeError" in (probe_model_path(str(hf)) or "")
    packed = tmp_path / "packed"
    packed.mkdir()
    assert "neither a GGUF file nor a model directory" in (probe_model_path(str(packed)) or "")
    shutil.rmtree(packed)
