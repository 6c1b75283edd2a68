"""The classify stage: sensitivity and difficulty under one time budget, and the request's
cheap facts (its size, images, tools, response format) as one `Features`."""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Any

import structlog

from gateway.classify.text import all_text
from gateway.features import NO_BUDGET, BudgetState, DifficultyFinding, Features, SensitivityFinding
from gateway.metrics import Metrics
from gateway.runtime import Runtime
from gateway.stages.call import Call

log = structlog.get_logger("gateway.pipeline")


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
