"""`hybrid-gateway policy test POLICY CASES.yaml`: table-driven routing cases, like `opa test`.

A cases file:

    cases:
      - name: offline goes local
        prompt: "hello"            # or `messages: [...]`
        offline: true              # optional; default online
        model: auto                # optional
        headers: {x-team: ml}      # optional
        client: mobile-app         # optional
        expect:                    # every key optional; all given must hold
          target: local
          rule: offline
          fallbacks: [local]
          redact: true
          action: route            # or block
          sensitivity: high
          difficulty: hard
          entities: {EMAIL_ADDRESS: 1}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.explain import explain_with, offline_runtime
from gateway.policy.model import Policy
from gateway.schema import APIError


class CaseError(Exception):
    pass


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    failures: tuple[str, ...]
    target: str | None
    rule: str


_EXPECT_KEYS = {"target", "rule", "fallbacks", "redact", "action", "sensitivity", "difficulty", "entities"}


def _actual(result: dict[str, Any]) -> dict[str, Any]:
    d, f = result["decision"], result["features"]
    return {
        "target": d["target"],
        "rule": d["rule"],
        "fallbacks": d["fallbacks"],
        "redact": d["redact"],
        "action": d["action"],
        "sensitivity": f["sensitivity"]["level"],
        "difficulty": f["difficulty"]["level"],
        "entities": f["sensitivity"]["entities"],
    }


def load_cases(path: str) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaseError(f"{path}:1:1: cases file not found") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{mark.line + 1}:{mark.column + 1}" if mark else "1:1"
        raise CaseError(f"{path}:{where}: invalid YAML: {exc.problem}") from None
    cases = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(cases, list) or not cases:
        raise CaseError(f"{path}:1:1: expected a top-level `cases:` list")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("expect"), dict):
            raise CaseError(f"{path}: case #{i + 1} needs a mapping with `expect:`")
        unknown = set(case["expect"]) - _EXPECT_KEYS
        if unknown:
            raise CaseError(f"{path}: case #{i + 1}: unknown expect keys {sorted(unknown)}")
        if "prompt" not in case and "messages" not in case:
            raise CaseError(f"{path}: case #{i + 1} needs `prompt` or `messages`")
    return cases


async def run_cases(policy: Policy, policy_path: str, cases_path: str) -> list[CaseResult]:
    cases = load_cases(cases_path)
    rt = offline_runtime(policy, policy_path)
    results = []
    try:
        for i, case in enumerate(cases):
            name = str(case.get("name") or f"case {i + 1}")
            messages = case.get("messages") or [{"role": "user", "content": str(case["prompt"])}]
            body = {"model": case.get("model", "auto"), "messages": messages}
            if case.get("tools"):
                body["tools"] = case["tools"]
            try:
                _, result = await explain_with(
                    rt, body, offline=bool(case.get("offline")), headers=case.get("headers"),
                    client=case.get("client"),
                )
            except APIError as exc:
                results.append(CaseResult(name, False, (f"error: {exc.message}",), None, "-"))
                continue
            actual = _actual(result)
            failures = tuple(
                f"{key}: expected {want!r}, got {actual[key]!r}"
                for key, want in case["expect"].items()
                if actual[key] != want
            )
            results.append(CaseResult(name, not failures, failures, actual["target"], actual["rule"]))
    finally:
        await rt.monitor.aclose()
    return results


def format_table(results: list[CaseResult]) -> str:
    width = max([len(r.name) for r in results] + [4])
    lines = [f"{'CASE'.ljust(width)}  RESULT  TARGET      RULE"]
    for r in results:
        lines.append(f"{r.name.ljust(width)}  {'PASS' if r.passed else 'FAIL'}    {r.target!s:<10}  {r.rule}")
        lines.extend(f"{' ' * width}    - {f}" for f in r.failures)
    passed = sum(r.passed for r in results)
    lines.append(f"{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)
