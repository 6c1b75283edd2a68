"""Explain a decision without a server and without calling any model (CLI `explain`, `policy test`)."""

from __future__ import annotations

import uuid
from typing import Any

from gateway import pipeline
from gateway.metrics import Metrics
from gateway.policy.model import Policy
from gateway.runtime import Runtime, build_runtime


def offline_runtime(policy: Policy, source: str) -> Runtime:
    """A runtime whose connectivity is only what we force: nothing is probed or called."""
    return build_runtime(policy, source, force="online")


async def explain_with(
    rt: Runtime,
    body: dict[str, Any],
    *,
    offline: bool = False,
    headers: dict[str, str] | None = None,
    client: str | None = None,
) -> tuple[pipeline.Prepared, dict[str, Any]]:
    for name, health in rt.monitor.health.items():
        # Explaining calls nothing, so a cloud target without a key is simulated like any other:
        # the question is what the policy would do, online or offline.
        health.disabled = False
        rt.monitor.force(name, "offline" if offline else "online")
    call = pipeline.Call(
        body=body,
        headers={k.lower(): v for k, v in (headers or {}).items()},
        client=client,
        request_id=uuid.uuid4().hex,
    )
    prepared = await pipeline.prepare(rt, call, Metrics(), score_all=True)
    return prepared, pipeline.explain(rt, prepared)


async def explain_offline(
    policy: Policy,
    source: str,
    body: dict[str, Any],
    *,
    offline: bool = False,
    headers: dict[str, str] | None = None,
    client: str | None = None,
) -> dict[str, Any]:
    rt = offline_runtime(policy, source)
    try:
        _, result = await explain_with(rt, body, offline=offline, headers=headers, client=client)
    finally:
        await rt.monitor.aclose()
    return result
