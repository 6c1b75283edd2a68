"""`local_tools: honour | refuse`: what a request with tools or a response_format gets when local
targets are what is left. decide() stays pure: table tests over Features, no server."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import pipeline
from gateway.features import DifficultyFinding, Features, SensitivityFinding
from gateway.policy.evaluate import decide
from gateway.policy.load import parse_policy
from gateway.stages.targets import all_failed_error

POLICY = parse_policy(
    """
version: 1
targets:
  cloud: {kind: cloud, model: openai/x, api_base: "http://127.0.0.1:9/v1", api_key: k}
  local: {kind: local, engine: local_engine, model_path: "builtin:smollm2-135m"}
defaults: {fallback: [local], local_tools: refuse}
rules:
  - {name: on-device, when: {header: {x-where: device}}, route: local}
  - {name: lenient, when: {header: {x-where: lenient}}, route: cloud, local_tools: honour}
  - {name: agents, route: cloud}
""",
    "test.yaml",
)
ONLINE, OFFLINE, DISABLED = ({"cloud": s} for s in ("online", "offline", "disabled"))


def features(connectivity: dict[str, Any], *, tools: bool = True, fmt: bool = False, where: str | None = None
             ) -> Features:
    return Features(model="auto", client=None, connectivity=connectivity, sensitivity=SensitivityFinding(),
                    difficulty=DifficultyFinding(), prompt_tokens=10, has_tools=tools,
                    headers={"x-where": where} if where else {}, has_response_format=fmt)


def test_refuse_with_the_cloud_online_leaves_the_local_targets_out() -> None:
    d = decide(features(ONLINE), POLICY)
    assert (d.action, d.chain, d.local_tools, d.refuses_local) == ("route", ("cloud",), "refuse", True)
    assert "tools: local targets local left out (local_tools: refuse)" in d.notes
    assert d.as_dict()["local_tools"] == "refuse"


@pytest.mark.parametrize(("connectivity", "why"), [
    (OFFLINE, "no cloud target of its chain is online (cloud offline)"),
    (DISABLED, "no cloud target of its chain is online (cloud disabled)"),
])
def test_refuse_with_only_local_targets_left_is_a_block_naming_the_rule(connectivity, why) -> None:
    d = decide(features(connectivity), POLICY)
    assert (d.action, d.block_status, d.block_code, d.local_tools) == ("block", 403, "local_tools_refused", "refuse")
    assert d.block_message == ("This request has tools, and rule 'agents' does not answer those on local targets "
                               f"(policy: local_tools = refuse); {why}.")


def test_a_response_format_counts_as_much_as_tools() -> None:
    d = decide(features(OFFLINE, tools=False, fmt=True), POLICY)
    assert d.action == "block" and d.block_message.startswith("This request has a response_format, and rule")
    both = decide(features(OFFLINE, fmt=True), POLICY)
    assert both.block_message.startswith("This request has tools and a response_format, and rule")


def test_plain_chat_is_not_concerned() -> None:
    d = decide(features(OFFLINE, tools=False), POLICY)
    assert (d.action, d.chain, d.local_tools, d.refuses_local) == ("route", ("cloud", "local"), None, False)
    assert not any("local_tools" in n for n in d.notes)


def test_a_rule_overrides_the_default_and_explains_it() -> None:
    d = decide(features(OFFLINE, where="lenient"), POLICY)
    assert (d.action, d.chain, d.local_tools) == ("route", ("cloud", "local"), "honour")
    assert "tools: honoured on local targets local (local_tools: honour)" in d.notes


def test_a_chain_without_a_cloud_target_is_refused_even_online() -> None:
    d = decide(features(ONLINE, where="device"), POLICY)
    assert (d.action, d.block_status) == ("block", 403)
    assert d.block_message.endswith("its chain has no cloud target.")


def test_a_request_naming_a_local_target_is_refused_rather_than_sent_out() -> None:
    d = decide(features(ONLINE), POLICY, pinned="local")
    assert (d.action, d.block_status) == ("block", 403)
    assert d.block_message.endswith("the request names local target 'local'.")
    assert decide(features(ONLINE), POLICY, pinned="cloud").chain == ("cloud",)


def test_decide_stays_pure() -> None:
    f = features(OFFLINE, fmt=True)
    assert decide(f, POLICY) == decide(f, POLICY)


def test_fail_closed_never_puts_a_refused_local_target_back() -> None:
    """A sensitivity analysis that failed takes the cloud out; the rule still refuses the device."""
    rt = SimpleNamespace(policy=POLICY)
    f = features(ONLINE)
    failed = Features(**{**f.__dict__, "sensitivity": SensitivityFinding(level="high", error="timeout")})
    d = pipeline.fail_closed(rt, failed, decide(failed, POLICY))  # type: ignore[arg-type]
    assert (d.action, d.block_status) == ("block", 503)
    plain = Features(**{**failed.__dict__, "has_tools": False})
    assert pipeline.fail_closed(rt, plain, decide(plain, POLICY)).chain == ("local",)  # type: ignore[arg-type]


def test_the_cli_explains_a_refusal_and_an_honoured_request(tmp_path) -> None:
    from click.testing import CliRunner

    from gateway.cli import main

    path = tmp_path / "p.yaml"
    path.write_text("""version: 1
targets:
  cloud: {kind: cloud, model: openai/x, api_base: "http://127.0.0.1:9/v1", api_key: k}
  local: {kind: local, engine: local_engine, model_path: "builtin:smollm2-135m"}
rules:
  - {name: agents, route: cloud, fallback: [local], local_tools: refuse}
""")
    tools = '[{"type": "function", "function": {"name": "f"}}]'
    r = CliRunner().invoke(main, ["explain", "--policy", str(path), "--offline", "--tools", tools, "hi"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)["decision"]
    assert (d["action"], d["local_tools"], d["block"]["status"]) == ("block", "refuse", 403)
    r = CliRunner().invoke(main, ["explain", "--policy", str(path), "--offline", "hi"])
    d = json.loads(r.output)["decision"]
    assert (d["action"], d["target"], d["local_tools"]) == ("route", "cloud", None)
    r = CliRunner().invoke(main, ["explain", "--policy", str(path), "--response-format", "[1]", "hi"])
    assert r.exit_code != 0 and "--response-format must be a JSON object" in r.output


def test_a_cloud_that_fails_says_the_device_was_left_out_on_purpose() -> None:
    from gateway.backends.base import BackendError
    from gateway.dispatch import AllTargetsFailed

    failed = AllTargetsFailed([("cloud", BackendError("connect", "connection refused"))], [])
    err = all_failed_error(failed, decide(features(ONLINE), POLICY))
    assert err.status == 503 and err.message.endswith(
        "local targets not tried: rule 'agents' does not answer tools or a response_format on them "
        "(local_tools: refuse)")
    plain = all_failed_error(failed, decide(features(ONLINE, tools=False), POLICY))
    assert "local targets not tried" not in plain.message
