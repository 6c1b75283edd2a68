"""The decision is a pure function of (features, policy): table tests, no server."""

from __future__ import annotations

import pytest

from gateway.features import DifficultyFinding, Features, SensitivityFinding
from gateway.policy.evaluate import decide, resolve_model
from gateway.policy.load import parse_policy

POLICY = parse_policy(
    """
version: 1
targets:
  cloud: {kind: cloud, model: openai/x, api_base: "http://127.0.0.1:9/v1", api_key: k}
  cloud2: {kind: cloud, model: openai/y, api_base: "http://127.0.0.1:9/v1", api_key: k}
  local: {kind: local, model: openai/l, api_base: "http://127.0.0.1:9/v1"}
aliases: {smart: cloud, anything: auto}
defaults: {fallback: [local]}
rules:
  - {name: offline, when: {connectivity: offline}, route: local}
  - {name: secrets, when: {sensitivity: {at_least: high}}, route: local}
  - {name: vip, when: {client: "vip-*", difficulty: medium}, route: cloud2, fallback: [cloud, local]}
  - {name: hard, when: {difficulty: {at_least: hard}}, route: cloud, redact: true}
  - {name: big, when: {prompt_tokens: {gt: 100, lt: 1000}}, route: cloud, fallback: []}
  - {name: tools, when: {has_tools: true, header: {x-env: "prod*"}}, route: cloud}
  - {name: deny-model, when: {model: "gpt-3*"}, block: {status: 410, message: gone}}
  - {name: default, route: local}
""",
    "test.yaml",
)


def features(**kw) -> Features:
    base = dict(
        model="auto", client=None, connectivity={"cloud": "online", "cloud2": "online"},
        sensitivity=SensitivityFinding(), difficulty=DifficultyFinding(), prompt_tokens=10, has_tools=False,
        headers={},
    )
    base.update(kw)
    return Features(**base)


@pytest.mark.parametrize(
    ("kw", "rule", "chain", "redact"),
    [
        ({}, "default", ("local",), False),
        ({"connectivity": {"cloud": "offline", "cloud2": "offline"}}, "offline", ("local",), False),
        ({"connectivity": {"cloud": "offline", "cloud2": "online"}}, "default", ("local",), False),
        ({"sensitivity": SensitivityFinding(level="high")}, "secrets", ("local",), False),
        ({"sensitivity": SensitivityFinding(level="medium"), "difficulty": DifficultyFinding(level="hard")},
         "hard", ("cloud", "local"), True),
        ({"client": "vip-1", "difficulty": DifficultyFinding(level="medium")}, "vip", ("cloud2", "cloud", "local"), False),
        ({"client": "vip-1", "difficulty": DifficultyFinding(level="hard")}, "hard", ("cloud", "local"), True),
        ({"client": None, "difficulty": DifficultyFinding(level="medium")}, "default", ("local",), False),
        ({"prompt_tokens": 500}, "big", ("cloud",), False),
        ({"prompt_tokens": 1000}, "default", ("local",), False),
        ({"has_tools": True, "headers": {"x-env": "production"}}, "tools", ("cloud", "local"), False),
        ({"has_tools": True}, "default", ("local",), False),
    ],
)
def test_rules(kw, rule, chain, redact):
    d = decide(features(**kw), POLICY)
    assert (d.rule, d.chain, d.redact, d.action) == (rule, chain, redact, "route")
    assert d.matched


def test_block_rule():
    d = decide(features(model="gpt-3.5-turbo"), POLICY)
    assert d.action == "block" and d.block_status == 410 and d.block_message == "gone" and d.chain == ()


def test_pure_same_inputs_same_decision():
    f = features(difficulty=DifficultyFinding(level="hard"))
    assert decide(f, POLICY) == decide(f, POLICY)


def test_pin_honoured_on_ordinary_rule_and_refused_by_guard():
    d = decide(features(), POLICY, pinned="cloud")
    assert d.chain == ("cloud", "local") and "pinned" in d.notes[0]
    guarded = decide(features(sensitivity=SensitivityFinding(level="high")), POLICY, pinned="cloud")
    assert guarded.chain == ("local",) and "refused" in guarded.notes[0]
    to_local = decide(features(difficulty=DifficultyFinding(level="hard")), POLICY, pinned="local")
    assert to_local.chain == ("local", "cloud")


def test_resolve_model():
    assert resolve_model(POLICY, "auto") is None
    assert resolve_model(POLICY, "anything") is None
    assert resolve_model(POLICY, "smart") == "cloud"
    assert resolve_model(POLICY, "local") == "local"
    with pytest.raises(KeyError):
        resolve_model(POLICY, "gpt-5")
