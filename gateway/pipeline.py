"""One request, one way: classify -> decide -> redact -> dispatch -> restore -> respond.

This is the only module that knows the order of the stages; each stage is a module of
gateway/stages/ over the small typed objects of gateway/stages/call.py and gateway/features.py.
`prepare` runs the stages before dispatch, `complete` and `stream` the rest for one answer
(`embed` for embeddings); gateway/respond.py then records what served it. The HTTP layer
(gateway/api) only converts wire format in and out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from gateway.dispatch import AllTargetsFailed, Outcome
from gateway.metrics import Metrics
from gateway.policy.evaluate import decide
from gateway.runtime import Runtime
from gateway.schema import APIError
from gateway.stages import restore
from gateway.stages.call import Call, Prepared, Served, stage
from gateway.stages.charge import answer_chars, charge, release, release_prepared
from gateway.stages.classify import classify, estimate_tokens, without_images
from gateway.stages.decide import blocked, fail_closed, max_tokens, pinned_target, requested_tokens
from gateway.stages.embed import EmbedCall, embed
from gateway.stages.redact import Redaction, needed, redact
from gateway.stages.stream import StreamRun
from gateway.stages.targets import TargetBodies, all_failed_error, options
from gateway.store import admission

__all__ = [  # what the routes, explain and the deferred queue use
    "Call", "EmbedCall", "Prepared", "Served", "complete", "embed", "estimate_tokens", "fail_closed",
    "prepare", "prompt_tokens", "release_prepared", "stream", "without_images",
]


async def prepare(rt: Runtime, call: Call, metrics: Metrics, score_all: bool = False) -> Prepared:
    """Admission, classify, decide and redact. `score_all`: run every classifier even if no rule
    reads its finding (explain shows them)."""
    try:
        return await _prepare(rt, call, metrics, score_all)
    except APIError as exc:
        if call.trace is not None:  # refused before any target: the request's span ends here
            call.trace.end(exc.status, {}, exc.code)
        raise


async def _prepare(rt: Runtime, call: Call, metrics: Metrics, score_all: bool) -> Prepared:
    pinned = pinned_target(rt, str(call.body.get("model", "")))
    # One store round trip before dispatch, before the classifiers (a refused request costs next
    # to nothing): the rate-limit tokens taken and the budget hold placed together.
    admitted = await admission.admit(rt.store, rt.limits, rt.budgets, call.client, tokens=requested_tokens(call.body),
                                     prompt_tokens=estimate_tokens(call.body), max_tokens=max_tokens(call.body),
                                     pinned=pinned)
    with stage(call, "classify") as span:
        try:
            features = await classify(rt, call, metrics, score_all, admitted.budget)
        except BaseException:
            release(rt, call, admitted.hold)
            raise
        if span is not None:
            span.set_attributes({"hybrid.sensitivity": features.sensitivity.level,
                                 "hybrid.entities": sorted(features.sensitivity.counts),
                                 "hybrid.difficulty": features.difficulty.level,
                                 "gen_ai.usage.input_tokens": features.prompt_tokens})
    with stage(call, "decide") as span:
        decision = fail_closed(rt, features, decide(features, rt.policy, pinned))
        if span is not None:
            span.set_attributes({"hybrid.rule": decision.rule, "hybrid.action": decision.action,
                                 "hybrid.chain": list(decision.chain)})
    redaction = Redaction(decision)
    if needed(rt, decision):
        with stage(call, "redact") as span:
            redaction = await redact(rt, call, features, decision)
            if span is not None:
                span.set_attribute("hybrid.redactions", len(redaction.vault) if redaction.vault is not None else 0)
    return Prepared(call=call, features=features, decision=redaction.decision, vault=redaction.vault,
                    redacted=redaction.redacted, native_redacted=redaction.native_redacted, hold=admitted.hold)


def _refuse_blocked(rt: Runtime, prepared: Prepared) -> None:
    if prepared.decision.action == "block":
        release_prepared(rt, prepared)
        raise blocked(prepared.decision)


def _served(prepared: Prepared, outcome: Outcome, bodies: TargetBodies) -> Served:
    redactions = len(prepared.vault) if prepared.vault is not None and prepared.redacted is not None else 0
    return Served(target=outcome.target, fallbacks=outcome.fallbacks, redactions=redactions, hedge=outcome.hedge,
                  parts=[outcome.part()], warnings=list(bodies.warnings))


async def complete(rt: Runtime, prepared: Prepared) -> tuple[dict[str, Any], Served]:
    """Dispatch, restore and charge one whole answer."""
    _refuse_blocked(rt, prepared)
    decision, bodies = prepared.decision, TargetBodies(rt, prepared)
    try:
        outcome = await rt.dispatcher.complete(decision.chain, bodies, options(rt, prepared.call),
                                               pace=decision.pace, hedge_after_s=decision.hedge_after_s)
    except AllTargetsFailed as exc:
        release_prepared(rt, prepared)
        raise all_failed_error(exc, decision) from None
    response = restore.completion(rt, prepared, outcome.target, outcome.response or {})
    served = _served(prepared, outcome, bodies)
    await charge(rt, prepared, served, [answer_chars(response)])
    return response, served


async def stream(rt: Runtime, prepared: Prepared) -> tuple[AsyncIterator[dict[str, Any]], Served, dict[str, Any]]:
    """The restored chunks in chat's schema (for a wire adapter to write in its format; an
    interruption arrives as an `{"error": ...}` dict), what served them, and a dict filled with
    usage as it streams."""
    _refuse_blocked(rt, prepared)
    decision, bodies, opts = prepared.decision, TargetBodies(rt, prepared), options(rt, prepared.call)
    try:
        outcome = await rt.dispatcher.stream(decision.chain, bodies, opts,
                                             pace=decision.pace, hedge_after_s=decision.hedge_after_s)
    except AllTargetsFailed as exc:
        release_prepared(rt, prepared)
        raise all_failed_error(exc, decision) from None
    run = StreamRun(rt, prepared, outcome, _served(prepared, outcome, bodies), bodies, opts)
    return run.events(), run.served, run.usage


async def prompt_tokens(rt: Runtime, prepared: Prepared, target: str) -> int:
    """The prompt's size for a stream that must say it first: the target's own count where it
    has a tokenizer here (the engine), else the classify stage's estimate (~4 characters a token)."""
    if not rt.is_engine(target):
        return prepared.features.prompt_tokens
    # Rendering and tokenizing a long prompt takes milliseconds: not on the event loop.
    counted = await asyncio.to_thread(rt.backends[target].prompt_tokens, TargetBodies(rt, prepared)(target))
    return counted if counted is not None else prepared.features.prompt_tokens
