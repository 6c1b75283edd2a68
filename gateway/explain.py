"""Explain a decision without a server and without calling any model (CLI `explain`, `policy test`).

Two views of connectivity:

* `explain_local` (the CLI) sees it as a freshly started server would: a cloud target without an
  API key is `disabled`, one with a key `online` (the server's optimistic start; nothing is
  probed), every one `offline` with `--offline`. Ask a running server (`--server`) for the live view.
* `explain_with` (`policy test`) simulates: every cloud target online, or every one offline, so
  the cases hold with or without a key on the machine that runs them.

`explain_local` loads only what the decision needs: the decision is a pure function of the
features, so it is first evaluated for every sensitivity and difficulty level; a classifier runs
only when the decision depends on its finding (or redaction needs the entities). The presidio
analyser alone takes seconds to load.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from gateway import pipeline
from gateway.connectivity import ConnectivityMonitor
from gateway.dispatch import Dispatcher
from gateway.features import (
    DIFFICULTY_LEVELS,
    SENSITIVITY_LEVELS,
    DifficultyFinding,
    Features,
    SensitivityFinding,
)
from gateway.metrics import Metrics
from gateway.policy.embeddings import Requested, plan, requested
from gateway.policy.evaluate import decide
from gateway.policy.model import Policy
from gateway.policy.targets import CloudTarget
from gateway.privacy.vault import VaultStore
from gateway.runtime import Runtime, build_runtime, shared_difficulty, shared_sensitivity
from gateway.schema import APIError
from gateway.stages.embed import redacts_input
from gateway.wire.base import invalid
from gateway.wire.embeddings import EmbeddingsRequest, classify_body


def describe(rt: Runtime, prepared: pipeline.Prepared) -> dict[str, Any]:
    """A prepared request's decision and every feature it was made on (POST /v1/route/explain,
    the CLI's `explain`)."""
    f, d = prepared.features, prepared.decision
    planned: dict[str, int] = {}
    if prepared.redacted is not None:
        planned = dict(f.sensitivity.counts)
    return {
        "decision": d.as_dict(),
        "features": {
            "model": f.model,
            "client": f.client,
            "connectivity": f.overall_connectivity,
            "targets": f.connectivity,
            "sensitivity": {
                "level": f.sensitivity.level,
                "entities": f.sensitivity.counts,
                "unscanned": list(f.sensitivity.unscanned),
                "error": f.sensitivity.error,
            },
            "difficulty": {
                "level": f.difficulty.level,
                "score": round(f.difficulty.score, 4),
                "method": f.difficulty.method,
                "reasons": f.difficulty.evidence.get("reasons", []),  # in words, strongest first
                "evidence": f.difficulty.evidence,
            },
            "prompt_tokens": f.prompt_tokens,
            "has_tools": f.has_tools,
            "has_images": f.has_images,
            "has_response_format": f.has_response_format,
            "budget": f.budget.as_dict(),
        },
        "redactions_planned": planned,
        "wire": {t: rt.policy.targets[t].api for t in d.chain},  # the API each target is called with
    }


def offline_runtime(policy: Policy, source: str) -> Runtime:
    """A runtime whose connectivity is only what we force: nothing is probed or called."""
    return build_runtime(policy, source, force="online")


def _call(body: dict[str, Any], headers: dict[str, str] | None, client: str | None) -> pipeline.Call:
    return pipeline.Call(
        body=body,
        headers={k.lower(): v for k, v in (headers or {}).items()},
        client=client,
        request_id=uuid.uuid4().hex,
    )


async def explain_with(
    rt: Runtime,
    body: dict[str, Any],
    *,
    offline: bool = False,
    headers: dict[str, str] | None = None,
    client: str | None = None,
) -> tuple[pipeline.Prepared, dict[str, Any]]:
    for name, health in rt.monitor.health.items():
        # A simulation: a cloud target without a key is treated like any other, online or offline.
        health.disabled = False
        rt.monitor.force(name, "offline" if offline else "online")
    return await _explained(rt, _call(body, headers, client), Metrics())


async def _explained(rt: Runtime, call: pipeline.Call, metrics: Metrics) -> tuple[pipeline.Prepared, dict[str, Any]]:
    prepared = await pipeline.prepare(rt, call, metrics, score_all=True)
    pipeline.release_prepared(rt, prepared)  # explained, never sent: nothing to hold
    return prepared, describe(rt, prepared)


async def explain_call(rt: Runtime, call: pipeline.Call, metrics: Metrics,
                       embedding: tuple[EmbeddingsRequest, Requested] | None = None) -> dict[str, Any]:
    """POST /v1/route/explain: the running gateway's decision on `call`, never sent; `embedding`:
    a POST /v1/embeddings body's request, whose embedding plan follows the decision."""
    prepared, result = await _explained(rt, call, metrics)
    if call.trace is not None:
        call.trace.end(200, {"hybrid.rule": prepared.decision.rule})
    if embedding is not None:
        result["embeddings"] = embedding_plan(rt.policy, prepared, *embedding)
    return result


F = TypeVar("F", SensitivityFinding, DifficultyFinding)


@dataclass(frozen=True)
class _Unneeded(Generic[F]):
    """Stands in for a classifier whose finding cannot change the decision: answers a fixed
    (valid) level at once; the explanation then reports the finding as `unscored`."""

    finding: F
    runs_inline = True

    def classify(self, body: dict[str, Any]) -> F:
        return self.finding


_NO_SENSITIVITY = _Unneeded(SensitivityFinding(level="none"))
_NO_DIFFICULTY = _Unneeded(DifficultyFinding(level="easy"))
_SKIPPED = "the decision does not depend on it (--score-all to compute it)"


def _light_runtime(policy: Policy, source: str, monitor: ConnectivityMonitor,
                   sensitivity: Any, difficulty: Any) -> Runtime:
    # No backends: explaining calls no model, so none is built (nor litellm imported).
    return Runtime(policy=policy, backends={}, monitor=monitor, dispatcher=Dispatcher(policy, {}, monitor),
                   sensitivity=sensitivity, difficulty=difficulty, vaults=VaultStore(ttl_s=60.0), source=source)


def depends_on(policy: Policy, features: Features, pinned: str | None) -> tuple[bool, bool]:
    """(sensitivity, difficulty): whether the decision for these features can change with that
    finding. Sensitivity also counts as needed when the decision may redact for a cloud target."""
    def outcome(s: str, d: str) -> tuple[Any, ...]:
        f = replace(features, sensitivity=SensitivityFinding(level=s), difficulty=DifficultyFinding(level=d))
        dec = decide(f, policy, pinned)
        redacts = dec.redact and any(policy.is_cloud(t) for t in dec.chain)
        return dec.rule, dec.action, dec.chain, redacts

    grid = {(s, d): outcome(s, d) for s in SENSITIVITY_LEVELS for d in DIFFICULTY_LEVELS}
    by_sensitivity = any(len({grid[s, d] for s in SENSITIVITY_LEVELS}) > 1 for d in DIFFICULTY_LEVELS)
    by_difficulty = any(len({grid[s, d] for d in DIFFICULTY_LEVELS}) > 1 for s in SENSITIVITY_LEVELS)
    redacts = any(o[3] for o in grid.values())
    return by_sensitivity or redacts, by_difficulty


@dataclass(frozen=True)
class LocalView:
    """What the CLI's `explain` is told about the request beyond its body."""

    offline: bool = False  # every cloud target offline (else: the server's optimistic start)
    headers: dict[str, str] | None = None
    client: str | None = None  # the authenticated client's name
    score_all: bool = False  # run every classifier, even those the decision does not depend on


async def explain_local(policy: Policy, source: str, body: dict[str, Any], view: LocalView = LocalView()
                        ) -> dict[str, Any]:
    return (await _explained_local(policy, source, body, view))[1]


async def _explained_local(policy: Policy, source: str, body: dict[str, Any], view: LocalView
                           ) -> tuple[pipeline.Prepared, dict[str, Any]]:
    clouds = {n: t for n, t in policy.targets.items() if isinstance(t, CloudTarget)}
    # The server's own monitor, never started: its view at start-up, and not a packet sent.
    monitor = ConnectivityMonitor(clouds, policy.connectivity, force_all="offline" if view.offline else "auto")
    call = _call(body, view.headers, view.client)
    try:
        first = await pipeline.prepare(_light_runtime(policy, source, monitor, _NO_SENSITIVITY, _NO_DIFFICULTY),
                                       call, Metrics())
        need_s, need_d = (True, True) if view.score_all else depends_on(policy, first.features, first.decision.pinned)
        rt = _light_runtime(policy, source, monitor,
                            shared_sensitivity(policy.privacy) if need_s else _NO_SENSITIVITY,
                            shared_difficulty(policy.difficulty) if need_d else _NO_DIFFICULTY)
        prepared = await pipeline.prepare(rt, call, Metrics(), score_all=need_d)
        result = describe(rt, prepared)
    finally:
        await monitor.aclose()
    if not need_s:
        result["features"]["sensitivity"] = {"level": "unscored", "entities": {}, "unscanned": [],
                                             "error": None, "skipped": _SKIPPED}
    if not need_d:
        result["features"]["difficulty"] = {"level": "unscored", "score": 0.0, "method": "skipped",
                                            "evidence": {"reason": _SKIPPED}}
    return prepared, result


# -- embeddings ---------------------------------------------------------------------------------


def is_embeddings(data: dict[str, Any]) -> bool:
    """An embeddings request body (POST /v1/embeddings' shape) rather than a chat one."""
    return "input" in data and "messages" not in data


def embeddings_request(data: dict[str, Any], policy: Policy) -> tuple[EmbeddingsRequest, Requested]:
    """The request and the space it asks for; APIError (400/404) as POST /v1/embeddings answers."""
    try:
        req = EmbeddingsRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None
    return req, requested(policy, req.model)


def embedding_plan(policy: Policy, prepared: pipeline.Prepared, req: EmbeddingsRequest,
                   want: Requested) -> dict[str, Any]:
    """What POST /v1/embeddings would do after the decision: the targets that may embed this
    input in the space asked for, in order, or the refusal it would answer."""
    would_redact = redacts_input(prepared)
    out: dict[str, Any] = {"space_asked": want.space or "auto", "would_redact": would_redact,
                           "redacted": False}  # an embedding input is never redacted (docs/apis.md)
    if prepared.decision.action != "route":
        return {**out, "chain": []}
    try:
        chosen = plan(policy, prepared.decision, want, would_redact=would_redact, dimensions=req.dimensions)
    except APIError as exc:
        return {**out, "chain": [], "refused": {"status": exc.status, "code": exc.code, "message": exc.message}}
    return {**out, "space": chosen.space, "chain": list(chosen.chain), "notes": list(chosen.notes)}


async def explain_embeddings_local(policy: Policy, source: str, data: dict[str, Any],
                                   view: LocalView = LocalView()) -> dict[str, Any]:
    """`explain_local` for an embeddings request: its inputs decided as chat's user messages, then
    the embedding plan (`embeddings` in the result). Raises APIError for a request the endpoint
    would refuse before deciding (bad body, unknown model)."""
    req, want = embeddings_request(data, policy)
    prepared, result = await _explained_local(policy, source, classify_body(req, want.model), view)
    result["embeddings"] = embedding_plan(policy, prepared, req, want)
    return result
