"""The decide stage around the pure `decide()`: the pinned model resolved, the fail-closed
narrowing when the privacy analysis or the vault is unavailable, and a block as its API error."""

from __future__ import annotations

import math
from typing import Any

from gateway.features import Features
from gateway.policy.evaluate import Decision, resolve_model
from gateway.runtime import Runtime
from gateway.schema import APIError
from gateway.stages.classify import estimate_tokens


def pinned_target(rt: Runtime, model: str) -> str | None:
    try:
        return resolve_model(rt.policy, model)
    except KeyError:
        raise APIError(
            404,
            f"The model `{model[:100]}` does not exist. Use `auto` or one of GET /v1/models.",
            code="model_not_found",
            param="model",
        ) from None


def fail_closed(rt: Runtime, features: Features, decision: Decision) -> Decision:
    """With no trustworthy sensitivity finding, drop every cloud target from the chain."""
    if features.sensitivity.error is None or decision.action != "route":
        return decision
    local = tuple(t for t in decision.chain if not rt.policy.is_cloud(t))
    if local == decision.chain:
        return decision
    on_error = rt.policy.privacy.on_error
    if not local and on_error == "local":
        local = tuple(n for n in rt.policy.targets if not rt.policy.is_cloud(n))[:1]
    note = "sensitivity analysis unavailable: cloud targets removed (fail closed)"
    return _local_only(decision, local, on_error == "block" or decision.refuses_local, note,
                       "Sensitivity analysis is unavailable and policy forbids sending this request out.")


def vault_unavailable(rt: Runtime, decision: Decision, reason: str) -> Decision:
    """A conversation vault the shared store cannot read or write: this turn's redacted data must
    not reach the cloud (the next turn could not be restored consistently), so serve it locally."""
    local = tuple(t for t in decision.chain if not rt.policy.is_cloud(t))
    if not local:
        local = tuple(n for n in rt.policy.targets if not rt.policy.is_cloud(n))[:1]
    return _local_only(decision, local, decision.refuses_local, f"{reason}: cloud targets removed (fail closed)",
                       "The conversation's vault is unavailable and no local target can answer.")


def _local_only(decision: Decision, local: tuple[str, ...], block: bool, note: str,
                message: str) -> Decision:
    """The decision with only `local` targets left, or a 503 block when none (or `block`)."""
    if not local or block:
        return Decision(
            rule=decision.rule,
            action="block",
            block_status=503,
            block_message=message,
            matched=decision.matched,
            pinned=decision.pinned,
            notes=(*decision.notes, note),
        )
    return Decision(
        rule=decision.rule,
        action="route",
        chain=local,
        redact=decision.redact,
        matched=decision.matched,
        pinned=decision.pinned,
        notes=(*decision.notes, note),
        paces=decision.paces,
        hedge_after_s=decision.hedge_after_s if len(local) > 1 else None,
        local_tools=decision.local_tools,
    )


def max_tokens(body: dict[str, Any]) -> int | None:
    """The answer's length the request asks room for, if it says."""
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    return asked if isinstance(asked, int) and asked > 0 else None


def requested_tokens(body: dict[str, Any]) -> int:
    """What a request may cost against a tokens/min limit: its prompt (estimated) and the answer
    it asks room for."""
    return estimate_tokens(body) + (max_tokens(body) or 0)


def blocked(decision: Decision) -> APIError:
    """A block decision as the error the client gets."""
    retry = decision.retry_after_s
    return APIError(
        decision.block_status or 403,
        decision.block_message or "Blocked by policy.",
        code=decision.block_code or "blocked_by_policy",
        type_="permission_error" if (decision.block_status or 403) == 403 else None,
        headers={"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None,
    )
