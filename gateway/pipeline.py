"""One request, one way: classify -> decide -> redact -> dispatch -> restore -> respond.

This is the only module that knows the order of the stages. Each stage is a function over the
small typed objects in gateway/features.py; the HTTP layer (gateway/api) only converts wire format
in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from gateway import resume
from gateway.backends.base import Backend, BackendError, CallOptions
from gateway.classify.text import all_text
from gateway.dispatch import AllTargetsFailed, Dispatcher, Fallback, Outcome, Part, aclose_quietly
from gateway.features import NO_BUDGET, BudgetState, DifficultyFinding, Features, SensitivityFinding
from gateway.hedge import Hedge
from gateway.metrics import Metrics
from gateway.policy.evaluate import Decision, decide, resolve_model
from gateway.privacy.native import CODECS, PassthroughStreamRestorer
from gateway.privacy.redact import redact_body
from gateway.privacy.restore import StreamRestorer
from gateway.privacy.vault import Vault
from gateway.runtime import Runtime
from gateway.schema import APIError
from gateway.store import admission
from gateway.store.base import Hold, StoreUnavailable
from gateway.store.budgets import Charge
from gateway.stream_deadline import StreamDeadline
from gateway.tracing import RequestTrace
from gateway.wire.passthrough import NATIVE, NativeAPI, Passthrough, answer_from_events

log = structlog.get_logger("gateway.pipeline")
audit = structlog.get_logger("gateway.audit")

@dataclass(frozen=True)
class Call:
    body: dict[str, Any]
    headers: dict[str, str]  # lower-cased names
    client: str | None
    request_id: str
    started: float = field(default_factory=time.monotonic)
    trace: RequestTrace | None = None  # None: tracing off (the default), and every stage skips it
    # The client's own body, for a target of its API (gateway/wire/passthrough.py); every stage
    # reads `body`, only a same-API backend this.
    passthrough: Passthrough | None = None


@dataclass
class Prepared:
    call: Call
    features: Features
    decision: Decision
    vault: Vault | None = None
    redacted: dict[str, Any] | None = None
    native_redacted: dict[str, Any] | None = None  # the pass-through body, redacted in its API's positions
    warnings: list[str] = field(default_factory=list)
    hold: Hold | None = None  # the budget hold placed before dispatch: settled by charge(), or released


@dataclass
class Served:
    """What the respond stage needs to build headers, metrics and the audit line."""

    target: str
    fallbacks: list[Fallback]
    redactions: int
    hedge: Hedge | None = None
    parts: list[Part] = field(default_factory=list)  # who wrote the answer: several for a resumed stream

    @property
    def model(self) -> str | None:
        """The model that produced the answer (its first part, for a resumed stream)."""
        return self.parts[0].model if self.parts else None


# -- classify ---------------------------------------------------------------------------------


def estimate_tokens(body: dict[str, Any]) -> int:
    # A provider-neutral estimate (~4 characters a token); the real count comes back in `usage`.
    return max(1, len(all_text(body)) // 4)


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image_url"


def has_images(body: dict[str, Any]) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) and any(map(_is_image, m["content"]))
               for m in body.get("messages") or ())


def has_response_format(body: dict[str, Any]) -> bool:
    fmt = body.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def without_images(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The body with its image_url parts removed, and how many there were."""
    dropped = 0
    messages = []
    for m in body.get("messages") or ():
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            kept = [p for p in m["content"] if not _is_image(p)]
            dropped += len(m["content"]) - len(kept)
            m = {**m, "content": kept}
        messages.append(m)
    return {**body, "messages": messages}, dropped


def _in_thread(metrics: Metrics, name: str, fn: Any, body: dict[str, Any]) -> asyncio.Future[Any]:
    """Starts `fn(body)` on a worker thread now (not at the loop's next turn, as a task would), so
    it runs while the inline classifiers work."""
    t0 = time.perf_counter()
    future = asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, fn, body)
    future.add_done_callback(lambda _: metrics.classify_seconds.labels(name).observe(time.perf_counter() - t0))
    return future


def _inline(metrics: Metrics, name: str, fn: Any, body: dict[str, Any]) -> Any:
    t0 = time.perf_counter()
    try:
        return fn(body)
    finally:
        metrics.classify_seconds.labels(name).observe(time.perf_counter() - t0)


def _sensitivity_failed(call: Call, exc: BaseException | None) -> SensitivityFinding:
    # Fail closed: an analysis we could not finish must never let the request reach the cloud.
    if exc is None:
        return SensitivityFinding(level="high", error="sensitivity analysis exceeded its time budget")
    log.error("sensitivity_failed", error=type(exc).__name__, request_id=call.request_id)
    return SensitivityFinding(level="high", error=f"sensitivity analysis failed ({type(exc).__name__})")


def _difficulty_failed(call: Call, exc: BaseException | None) -> DifficultyFinding:
    if exc is None:
        return DifficultyFinding(level="easy", method="timeout", evidence={"error": "over budget"})
    log.error("difficulty_failed", error=type(exc).__name__, request_id=call.request_id)
    return DifficultyFinding(level="easy", method="error", evidence={"error": type(exc).__name__})


# Difficulty is only a routing signal: when no rule reads it, scoring it is pure cost (the
# heuristic alone is most of what the gateway adds to a request). Sensitivity is always analysed:
# redaction and fail-closed depend on it whatever the rules say.
UNSCORED = DifficultyFinding(level="unscored", method="skipped",
                             evidence={"reason": "no rule of the policy reads difficulty"})


async def _run_classifiers(rt: Runtime, call: Call, metrics: Metrics,
                           score_all: bool = False) -> tuple[SensitivityFinding, DifficultyFinding]:
    """Both classifiers under one time budget: cheap ones inline, model-backed ones in threads."""
    jobs = {"sensitivity": rt.sensitivity.classify, "difficulty": rt.difficulty.classify}
    if not (score_all or rt.policy.reads_difficulty):
        del jobs["difficulty"]
    inline = {n for n, c in (("sensitivity", rt.sensitivity), ("difficulty", rt.difficulty))
              if n in jobs and c.runs_inline}
    results: dict[str, Any] = {}
    errors: dict[str, BaseException | None] = {}
    tasks = {n: _in_thread(metrics, n, fn, call.body) for n, fn in jobs.items() if n not in inline}
    for name in inline:
        try:
            results[name] = _inline(metrics, name, jobs[name], call.body)
        except Exception as exc:
            errors[name] = exc
    if tasks:
        done, _ = await asyncio.wait(tasks.values(), timeout=rt.policy.limits.classify_budget_ms / 1000)
        for name, task in tasks.items():
            if task not in done:
                task.cancel()  # the thread finishes on its own; its result is ignored
                errors[name] = None
            elif task.exception() is not None:
                errors[name] = task.exception()
            else:
                results[name] = task.result()
    sensitivity = results.get("sensitivity") or _sensitivity_failed(call, errors.get("sensitivity"))
    if "difficulty" not in jobs:
        return sensitivity, UNSCORED
    difficulty = results.get("difficulty") or _difficulty_failed(call, errors.get("difficulty"))
    return sensitivity, difficulty


async def classify(rt: Runtime, call: Call, metrics: Metrics, score_all: bool = False,
                   budget: BudgetState = NO_BUDGET) -> Features:
    sensitivity, difficulty = await _run_classifiers(rt, call, metrics, score_all)
    return Features(
        model=str(call.body.get("model", "")),
        client=call.client,
        connectivity=rt.monitor.snapshot(),
        sensitivity=sensitivity,
        difficulty=difficulty,
        prompt_tokens=estimate_tokens(call.body),
        has_tools=bool(call.body.get("tools")),
        headers=call.headers,
        has_images=has_images(call.body),
        has_response_format=has_response_format(call.body),
        budget=budget,
    )


# -- decide -----------------------------------------------------------------------------------


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


def release(rt: Runtime, call: Call, hold: Hold | None) -> None:
    """A held request that ends without an answer to charge: its budget hold is released."""
    if hold is not None and rt.budgets is not None:
        rt.budgets.release(hold, call.client)


def release_prepared(rt: Runtime, prepared: Prepared) -> None:
    release(rt, prepared.call, prepared.hold)
    prepared.hold = None


def vault_unavailable(rt: Runtime, decision: Decision, reason: str) -> Decision:
    """A conversation vault the shared store cannot read or write: this turn's redacted data must
    not reach the cloud (the next turn could not be restored consistently), so serve it locally."""
    local = tuple(t for t in decision.chain if not rt.policy.is_cloud(t))
    if not local:
        local = tuple(n for n in rt.policy.targets if not rt.policy.is_cloud(n))[:1]
    return _local_only(decision, local, decision.refuses_local, f"{reason}: cloud targets removed (fail closed)",
                       "The conversation's vault is unavailable and no local target can answer.")


_UNTRACED = contextlib.nullcontext()


def _stage(call: Call, name: str) -> contextlib.AbstractContextManager[Any]:
    """The stage's span, or a shared do-nothing context when tracing is off."""
    return call.trace.stage(name) if call.trace is not None else _UNTRACED


async def prepare(rt: Runtime, call: Call, metrics: Metrics, score_all: bool = False) -> Prepared:
    """`score_all`: run every classifier even if no rule reads its finding (explain shows them)."""
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
    with _stage(call, "classify") as span:
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
    with _stage(call, "decide") as span:
        decision = fail_closed(rt, features, decide(features, rt.policy, pinned))
        if span is not None:
            span.set_attributes({"hybrid.rule": decision.rule, "hybrid.action": decision.action,
                                 "hybrid.chain": list(decision.chain)})
    prepared = Prepared(call=call, features=features, decision=decision, hold=admitted.hold)
    if decision.action == "route" and decision.redact and any(rt.policy.is_cloud(t) for t in decision.chain):
        with _stage(call, "redact") as span:
            await _redact(rt, call, prepared)
            if span is not None:
                span.set_attribute("hybrid.redactions", len(prepared.vault) if prepared.vault is not None else 0)
    return prepared


async def _redact(rt: Runtime, call: Call, prepared: Prepared) -> None:
    """Placeholders in for the cloud, the vault kept (per conversation when the request names one)."""
    features, decision = prepared.features, prepared.decision
    conversation = call.headers.get("x-hybrid-conversation-id") or (
        (call.body.get("metadata") or {}).get("conversation_id")
        if isinstance(call.body.get("metadata"), dict)
        else None
    )
    cid = str(conversation) if conversation else None
    try:
        prepared.vault = await rt.vaults.load(cid)
        prepared.redacted = redact_body(call.body, features.sensitivity, prepared.vault, rt.policy.privacy)
        if call.passthrough is not None:  # the same vault's values, in the client's own body
            prepared.native_redacted = CODECS[call.passthrough.api].redact(call.passthrough.body, prepared.vault)
        await rt.vaults.save(cid, prepared.vault)
    except StoreUnavailable:
        log.warning("conversation_vault_unavailable", request_id=call.request_id)
        prepared.vault, prepared.redacted, prepared.native_redacted = None, None, None
        prepared.decision = vault_unavailable(rt, decision, "conversation vault unavailable")


def _warn(prepared: Prepared, warning: str) -> None:
    if warning not in prepared.warnings:
        prepared.warnings.append(warning)


def passthrough_api(rt: Runtime, prepared: Prepared, target: str) -> NativeAPI | None:
    """The API `target` is sent the client's own body in (it speaks the client's API), or None."""
    pt = prepared.call.passthrough
    if pt is None or rt.policy.targets[target].api != pt.api:
        return None
    if prepared.features.has_images and not rt.policy.takes_images(target):
        return None  # translated, so the images can be dropped
    return pt.api


def body_for(rt: Runtime, prepared: Prepared, target: str, native: bool = True) -> dict[str, Any]:
    """The body a target receives: redacted for the cloud when the rule says so, without what the
    target cannot take (said in x-hybrid-warning), and for the engine under the engine's model name
    (which it answers with). A target of the client's own API also gets the client's body
    (`native`; a resumed answer's continuation does not: it is written in chat)."""
    redacting = prepared.redacted is not None and rt.policy.is_cloud(target)
    body = prepared.redacted if redacting and prepared.redacted is not None else prepared.call.body
    if native and prepared.call.passthrough is not None and passthrough_api(rt, prepared, target) is not None:
        return {**body, NATIVE: prepared.native_redacted if redacting else prepared.call.passthrough.body}
    if prepared.features.has_images and not rt.policy.takes_images(target):
        body, n = without_images(body)
        _warn(prepared, f"{target} cannot take images: {n} image part{'s' if n != 1 else ''} dropped")
    if rt.is_engine(target):  # tools and response_format included: the engine decodes under a grammar
        body = {**body, "model": rt.engine_model(target)}
    return body


def _restoring(rt: Runtime, prepared: Prepared, target: str) -> bool:
    return prepared.vault is not None and prepared.redacted is not None and rt.policy.is_cloud(target)


def _stream_restorer(rt: Runtime, prepared: Prepared, target: str,
                     native: bool = True) -> StreamRestorer | PassthroughStreamRestorer | None:
    if not _restoring(rt, prepared, target):
        return None
    assert prepared.vault is not None
    api = passthrough_api(rt, prepared, target) if native else None
    if api is not None:
        return PassthroughStreamRestorer(prepared.vault.stream_restorer(), CODECS[api].event_restorer(prepared.vault))
    return prepared.vault.stream_restorer()


def _all_failed_error(exc: AllTargetsFailed, decision: Decision | None = None) -> APIError:
    invalid = exc.invalid
    if invalid is not None:
        return APIError(invalid.status or 400, invalid.message, code="upstream_rejected")
    retry_after = exc.retry_after
    overloaded = any(e.kind == "overloaded" for _, e in exc.errors)
    seconds = max(1, math.ceil(retry_after)) if retry_after is not None else (2 if overloaded else 5)
    left_out = (f"; local targets not tried: rule {decision.rule!r} does not answer tools or a response_format "
                "on them (local_tools: refuse)") if decision is not None and decision.refuses_local else ""
    return APIError(
        503,
        "No target could serve this request: " + "; ".join(f"{t}: {e.reason}" for t, e in exc.errors) + left_out,
        code="all_targets_unavailable" if not overloaded else "local_engine_busy",
        headers={"Retry-After": str(seconds)},
    )


def _options(rt: Runtime, call: Call) -> CallOptions:
    return CallOptions(deadline=call.started + rt.policy.limits.request_timeout_s, request_id=call.request_id,
                       trace=call.trace)


def _blocked(decision: Decision) -> APIError:
    retry = decision.retry_after_s
    return APIError(
        decision.block_status or 403,
        decision.block_message or "Blocked by policy.",
        code=decision.block_code or "blocked_by_policy",
        type_="permission_error" if (decision.block_status or 403) == 403 else None,
        headers={"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None,
    )


# -- dispatch + restore -----------------------------------------------------------------------


async def complete(rt: Runtime, prepared: Prepared) -> tuple[dict[str, Any], Served]:
    decision = prepared.decision
    if decision.action == "block":
        release_prepared(rt, prepared)
        raise _blocked(decision)
    try:
        outcome = await rt.dispatcher.complete(
            decision.chain, lambda t: body_for(rt, prepared, t), _options(rt, prepared.call),
            pace=decision.pace, hedge_after_s=decision.hedge_after_s,
        )
    except AllTargetsFailed as exc:
        release_prepared(rt, prepared)
        raise _all_failed_error(exc, decision) from None
    response = outcome.response or {}
    if isinstance(events := response.get(NATIVE), list):  # read as a stream (slowness limits): its events
        api = passthrough_api(rt, prepared, outcome.target)
        answer = answer_from_events(api, events) if api is not None else None
        response = {k: v for k, v in response.items() if k != NATIVE} | ({NATIVE: answer} if answer else {})
    if _restoring(rt, prepared, outcome.target):
        assert prepared.vault is not None
        with _stage(prepared.call, "restore"):
            response = prepared.vault.restore_completion(response)
            api = passthrough_api(rt, prepared, outcome.target)
            if api is not None and isinstance(response.get(NATIVE), dict):
                response[NATIVE] = CODECS[api].restore(response[NATIVE], prepared.vault)
    served = _served(prepared, outcome)
    await charge(rt, prepared, served, [_answer_chars(response)])
    return response, served


def _answer_chars(response: dict[str, Any]) -> int:
    return sum(len(c["message"].get("content") or "") for c in response.get("choices") or ()
               if isinstance(c, dict) and isinstance(c.get("message"), dict))


async def charge(rt: Runtime, prepared: Prepared, served: Served, answer_chars: list[int]) -> None:
    """Count the answer against the client's usage and budget: each part's reported usage, or the
    ~4 characters a token estimate (`answer_chars`: the text each part wrote) where it sent none."""
    if rt.budgets is None or prepared.call.client is None:
        return
    charges = []
    for part, chars in zip(served.parts, answer_chars, strict=False):
        used = part.usage or {}
        prompt, completion = used.get("prompt_tokens"), used.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            charges.append(Charge(part.target, prompt, completion))
        else:
            charges.append(Charge(part.target, prepared.features.prompt_tokens, (chars + 3) // 4, estimated=True))
    hold, prepared.hold = prepared.hold, None  # settled once
    try:
        rt.budgets.charge(prepared.call.client, hold, charges)
    except Exception as exc:  # counting must never fail an answer already given
        log.error("usage_charge_failed", error=type(exc).__name__, request_id=prepared.call.request_id)


def _served(prepared: Prepared, outcome: Outcome) -> Served:
    redactions = len(prepared.vault) if prepared.vault is not None and prepared.redacted is not None else 0
    return Served(target=outcome.target, fallbacks=outcome.fallbacks, redactions=redactions, hedge=outcome.hedge,
                  parts=[outcome.part()])


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _as_is(data: dict[str, Any]) -> dict[str, Any]:
    return data


async def stream(rt: Runtime, prepared: Prepared,
                 encoded: bool = True) -> tuple[AsyncIterator[Any], Served, dict[str, Any]]:
    """Returns the SSE byte stream, what served it, and a dict filled with usage as it streams.

    `encoded=False`: the restored chunk dicts instead (no `[DONE]`), for a wire adapter that
    translates them into another API's events; an interruption arrives as an `{"error": ...}` dict."""
    decision = prepared.decision
    if decision.action == "block":
        release_prepared(rt, prepared)
        raise _blocked(decision)
    opts = _options(rt, prepared.call)
    try:
        outcome = await rt.dispatcher.stream(decision.chain, lambda t: body_for(rt, prepared, t), opts,
                                             pace=decision.pace, hedge_after_s=decision.hedge_after_s)
    except AllTargetsFailed as exc:
        release_prepared(rt, prepared)
        raise _all_failed_error(exc, decision) from None
    want_usage = bool((prepared.call.body.get("stream_options") or {}).get("include_usage"))
    usage: dict[str, Any] = {}
    served = _served(prepared, outcome)

    async def chunks(current: Outcome, partial: resume.Partial) -> AsyncIterator[dict[str, Any]]:
        for chunk in current.head:
            yield chunk
        rest = current.rest
        if rest is None:
            return
        # Stalls and slow drips end the stream here only where another target can resume it.
        guard = StreamDeadline(opts.deadline, decision.pace(current.target),
                               may_move=lambda: _can_resume(rt, prepared, current.target, partial))
        try:
            while True:
                try:
                    chunk = await guard.next(rest)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise BackendError("timeout", "request deadline passed mid-stream") from None
                except BackendError:
                    raise
                except Exception as exc:  # end the stream cleanly whatever the backend raised
                    raise BackendError("protocol", f"unexpected {type(exc).__name__} mid-stream") from None
                yield chunk
        finally:
            guard.close()

    def out(chunk: dict[str, Any], restorer: StreamRestorer | PassthroughStreamRestorer | None) -> list[dict[str, Any]]:
        if chunk.get("usage"):
            usage.update(chunk["usage"])
            served.parts[-1].usage = chunk["usage"]  # the part being streamed now
            if not chunk.get("choices") and NATIVE not in chunk:  # a pass-through's events go on
                return [chunk] if want_usage else []
            if not want_usage:
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return restorer.feed(chunk) if restorer is not None else [chunk]

    emit = sse if encoded else _as_is

    async def body() -> AsyncIterator[Any]:
        current, partial = outcome, resume.Partial()
        trace = prepared.call.trace
        # A stream is restored chunk by chunk: its restore span lasts as long as the stream.
        restore_span = trace.open("restore", **{"hybrid.stream": True}) \
            if trace is not None and _restoring(rt, prepared, outcome.target) else None
        marks = [0]  # where each part's text starts in what the client saw
        try:
            while True:
                resumed = current is not outcome
                restorer = _stream_restorer(rt, prepared, current.target, native=not resumed)
                partial.raw_seen |= restorer is None
                try:
                    async for got in chunks(current, partial):
                        chunk = resume.seamless(got, partial) if resumed else got
                        if chunk is None:
                            continue
                        for c in out(chunk, restorer):
                            partial.seen(c)
                            yield emit(c)
                    for c in restorer.flush() if restorer is not None else ():
                        partial.seen(c)
                        yield emit(c)
                    break
                except BackendError as exc:
                    log.warning("stream_interrupted", target=current.target, reason=exc.reason,
                                request_id=prepared.call.request_id)
                    # Text the restorer still holds (a placeholder cut by the break) is not sent:
                    # the next target goes on from what the client has actually seen.
                    nxt = await _resume(rt, prepared, current.target, partial, opts)
                    if nxt is None:
                        for c in restorer.flush() if restorer is not None else ():
                            yield emit(c)
                        # Tokens were already sent and no target can write the rest: end the stream
                        # with an error event the OpenAI SDK raises on, never a hung connection.
                        yield emit(_stream_error(current.target, exc))
                        usage["error"] = exc.reason
                        break
                    served.fallbacks.append(Fallback(current.target, nxt.target, f"resumed_mid_stream:{exc.reason}"))
                    served.parts.append(nxt.part())
                    marks.append(len(partial.text))
                    await aclose_quietly(current.rest)
                    current = nxt
        finally:
            await aclose_quietly(current.rest)
            if restore_span is not None:
                restore_span.end()
            ends = [*marks[1:], len(partial.text)]
            await charge(rt, prepared, served, [end - start for start, end in zip(marks, ends, strict=True)])
        if encoded:
            yield SSE_DONE

    return body(), served, usage


def _stream_error(target: str, exc: BackendError) -> dict[str, Any]:
    return {
        "error": {
            "message": f"The upstream stream from {target} was interrupted ({exc.reason}).",
            "type": "upstream_error",
            "param": None,
            "code": "stream_interrupted",
        }
    }


def _can_resume(rt: Runtime, prepared: Prepared, failed: str, partial: resume.Partial) -> bool:
    return bool(resume.candidates(prepared.decision.chain, failed, partial, policy=rt.policy,
                                  redacting=prepared.redacted is not None, is_engine=rt.is_engine))


async def _resume(rt: Runtime, prepared: Prepared, failed: str, partial: resume.Partial,
                  opts: CallOptions) -> Outcome | None:
    """The rest of the answer from the next target that can continue it, or None."""
    redacting = prepared.redacted is not None
    chain = resume.candidates(prepared.decision.chain, failed, partial, policy=rt.policy, redacting=redacting,
                              is_engine=rt.is_engine)
    if not chain:
        return None

    def body(target: str) -> dict[str, Any]:
        sees_redacted = redacting and rt.policy.is_cloud(target)
        return resume.continuation_body(body_for(rt, prepared, target, native=False), partial, engine=rt.is_engine(target),
                                        vault=prepared.vault if sees_redacted else None)

    try:
        return await rt.dispatcher.stream(chain, body, opts, pace=prepared.decision.pace)
    except AllTargetsFailed as exc:
        log.warning("stream_resume_failed", reason=str(exc)[:200], request_id=prepared.call.request_id)
        return None


# -- embeddings -------------------------------------------------------------------------------

EmbedCall = Callable[[str, CallOptions], Awaitable[dict[str, Any]]]  # (target, options) -> its answer


class _EmbeddingTarget(Backend):
    """One target's embeddings call as the dispatcher calls a backend (`complete`), so embeddings
    get chat's retries, fallbacks and connectivity bookkeeping unchanged."""

    def __init__(self, name: str, call: EmbedCall) -> None:
        self.name = name
        self._call = call

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        return await self._call(self.name, opts)

    def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]:
        raise BackendError("invalid", "embeddings do not stream")


def refuse_blocked(prepared: Prepared) -> None:
    if prepared.decision.action == "block":
        raise _blocked(prepared.decision)


async def embed(rt: Runtime, prepared: Prepared, chain: tuple[str, ...],
                call: EmbedCall) -> tuple[dict[str, Any], Served]:
    """An embeddings request along `chain`: the decision's chain as gateway/policy/embeddings.py
    narrowed it. Nothing is redacted or restored: an embedding input is never redacted (the plan
    keeps such inputs on the device instead)."""
    refuse_blocked(prepared)
    dispatcher = Dispatcher(rt.policy, {t: _EmbeddingTarget(t, call) for t in chain}, rt.monitor)
    try:
        outcome = await dispatcher.complete(chain, lambda t: {}, _options(rt, prepared.call))
    except AllTargetsFailed as exc:
        release_prepared(rt, prepared)
        raise _all_failed_error(exc) from None
    response = outcome.response or {}
    billed = Served(target=outcome.target, fallbacks=[], redactions=0,
                    parts=[Part(outcome.target, usage=_embedding_usage(response))])
    await charge(rt, prepared, billed, [0])
    return response, Served(target=outcome.target, fallbacks=outcome.fallbacks, redactions=0)


def _embedding_usage(response: dict[str, Any]) -> dict[str, Any] | None:
    used = response.get("usage")
    if isinstance(used, dict) and isinstance(used.get("prompt_tokens"), int):
        return {"prompt_tokens": used["prompt_tokens"], "completion_tokens": 0}
    return None


def explain(rt: Runtime, prepared: Prepared) -> dict[str, Any]:
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

