"""Embeddings' dispatch: the decision's chain as gateway/policy/embeddings.py narrowed it, with
chat's retries, fallbacks and connectivity bookkeeping. Nothing is redacted or restored: an
embedding input is never redacted (the plan keeps such inputs on the device instead)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.backends.base import Backend, BackendError, CallOptions
from gateway.dispatch import AllTargetsFailed, Dispatcher, Part
from gateway.policy.embeddings import Requested, plan
from gateway.runtime import Runtime
from gateway.stages.call import Prepared, Served
from gateway.stages.charge import charge, release_prepared
from gateway.stages.decide import blocked
from gateway.stages.targets import all_failed_error, options

EmbedCall = Callable[[str, CallOptions], Awaitable[dict[str, Any]]]  # (target, options) -> its answer


class _EmbeddingTarget(Backend):
    """One target's embeddings call as the dispatcher calls a backend (`complete`)."""

    def __init__(self, name: str, call: EmbedCall) -> None:
        self.name = name
        self._call = call

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        return await self._call(self.name, opts)

    def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]:
        raise BackendError("invalid", "embeddings do not stream")


def redacts_input(prepared: Prepared) -> bool:
    """The rule redacts and the input holds something it would replace."""
    return prepared.redacted is not None and prepared.redacted != prepared.call.body


async def embed(rt: Runtime, prepared: Prepared, want: Requested, dimensions: int | None,
                call: EmbedCall) -> tuple[dict[str, Any], Served]:
    """An embeddings request along the decision's chain as the plan narrows it to the targets
    that may embed this input in the space `want`s."""
    if prepared.decision.action == "block":
        raise blocked(prepared.decision)
    chosen = plan(rt.policy, prepared.decision, want, would_redact=redacts_input(prepared), dimensions=dimensions)
    # Nothing is redacted on this endpoint: the redaction prepare planned is never sent.
    prepared.redacted, prepared.vault = None, None
    chain = chosen.chain
    dispatcher = Dispatcher(rt.policy, {t: _EmbeddingTarget(t, call) for t in chain}, rt.monitor)
    try:
        outcome = await dispatcher.complete(chain, lambda t: {}, options(rt, prepared.call))
    except AllTargetsFailed as exc:
        release_prepared(rt, prepared)
        raise all_failed_error(exc) from None
    response = outcome.response or {}
    billed = Served(target=outcome.target, fallbacks=[], redactions=0,
                    parts=[Part(outcome.target, usage=_embedding_usage(response))])
    await charge(rt, prepared, billed, [0])
    return response, Served(target=outcome.target, fallbacks=outcome.fallbacks, redactions=0,
                           warnings=list(chosen.notes))  # what the plan changed


def _embedding_usage(response: dict[str, Any]) -> dict[str, Any] | None:
    used = response.get("usage")
    if isinstance(used, dict) and isinstance(used.get("prompt_tokens"), int):
        return {"prompt_tokens": used["prompt_tokens"], "completion_tokens": 0}
    return None
