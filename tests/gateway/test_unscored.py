"""Difficulty is scored only when a rule reads it; sensitivity always is."""

from __future__ import annotations

import asyncio

from gateway.metrics import Metrics
from gateway.pipeline import Call, prepare
from gateway.policy.load import parse_policy
from gateway.runtime import build_runtime

BASE = """
version: 1
targets:
  local: {kind: local, model: openai/local-model, api_base: "http://127.0.0.1:9/v1"}
connectivity: {probe_interval_s: 30}
privacy: {nlp_model: none}
difficulty: {method: heuristic}
rules:
"""
WITH_DIFFICULTY = BASE + "  - {name: hard, when: {difficulty: hard}, route: local}\n  - {name: all, route: local}\n"
WITHOUT = BASE + "  - {name: all, route: local}\n"
BODY = {"model": "auto", "messages": [{"role": "user", "content": "Prove step by step that 2 + 2 = 4, mail a@b.co"}]}


def _prepare(text: str, score_all: bool = False):
    rt = build_runtime(parse_policy(text, "p.yaml"), "p.yaml", force="offline")
    return asyncio.run(prepare(rt, Call(body=BODY, headers={}, client=None, request_id="r"), Metrics(),
                               score_all=score_all))


def test_a_policy_without_difficulty_rules_does_not_score_it() -> None:
    f = _prepare(WITHOUT).features
    assert f.difficulty.level == "unscored" and f.difficulty.method == "skipped"
    assert f.sensitivity.counts == {"EMAIL_ADDRESS": 1}  # sensitivity is analysed regardless


def test_a_rule_on_difficulty_gets_it_scored() -> None:
    f = _prepare(WITH_DIFFICULTY).features
    assert f.difficulty.method == "heuristic" and f.difficulty.level in ("easy", "medium", "hard")
    assert f.difficulty.evidence["signals"]["reasoning_cues"] >= 1


def test_explain_scores_everything() -> None:
    assert _prepare(WITHOUT, score_all=True).features.difficulty.method == "heuristic"
