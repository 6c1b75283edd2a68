"""The respond stage: what a served (or failed, or refused) request leaves behind besides its body.

The `x-hybrid-*` headers that say how it was routed, the Prometheus counters, the request's trace
span and the audit line (with the prompt redacted, raw or left out as `--audit-prompts` says).
Every API's route calls it the same way, so the wire modules only convert formats.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway.privacy.redact import redact_body
from gateway.privacy.vault import Vault
from gateway.schema import APIError

if TYPE_CHECKING:
    from gateway.pipeline import Prepared, Served
    from gateway.state import GatewayState

CHAT_ENDPOINT = "/v1/chat/completions"


def route_headers(prepared: Prepared, served: Served) -> dict[str, str]:
    """The answer's `x-hybrid-*` headers: where it went, by which rule, on what it was classified."""
    f = prepared.features
    h = {
        "x-hybrid-route": served.target,
        "x-hybrid-rule": prepared.decision.rule,
        "x-hybrid-connectivity": f.overall_connectivity,
        "x-hybrid-sensitivity": f.sensitivity.level,
        "x-hybrid-difficulty": f.difficulty.level,
        "x-hybrid-redactions": str(served.redactions),
        "x-request-id": prepared.call.request_id,
    }
    if served.model:  # as the answer names it (a stream: its first part's; the audit line has every part)
        h["x-hybrid-model"] = _header_safe(served.model)
    if served.fallbacks:
        h["x-hybrid-fallback"] = ", ".join(str(fb) for fb in served.fallbacks)
    if served.warnings:
        h["x-hybrid-warning"] = "; ".join(served.warnings)
    if prepared.decision.pin_refused:
        h["x-hybrid-pin-refused"] = prepared.decision.pin_refused
    return h


def _header_safe(value: str) -> str:
    """An upstream's model name as a header value: printable ASCII, bounded."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in value[:200])


def record(
    state: GatewayState,
    prepared: Prepared,
    served: Served | None,
    status: int,
    usage: dict[str, Any],
    stream: bool,
    endpoint: str = CHAT_ENDPOINT,
) -> None:
    """Count a decided request in /metrics, end its trace span and write its audit line."""
    elapsed = time.monotonic() - prepared.call.started
    route = served.target if served else "-"
    if prepared.call.trace is not None:
        _end_trace(prepared, served, status, usage)
    m = state.metrics
    m.requests.labels(route, prepared.decision.rule, str(status), endpoint).inc()
    m.latency.labels(route, str(stream).lower(), endpoint).observe(elapsed)
    counts = prepared.features.sensitivity.counts if prepared.redacted is not None else {}
    if served:
        for fb in served.fallbacks:
            m.fallbacks.labels(fb.source, fb.to, fb.reason).inc()
        if served.hedge:
            m.hedges.labels(served.hedge.source, served.hedge.started).inc()
            m.hedge_wins.labels(served.hedge.winner or "-").inc()
        for entity, n in counts.items():
            m.redactions.labels(entity).inc(n)
        # Tokens per target that wrote them (a resumed stream has several parts), where reported.
        for target, used in [(p.target, p.usage or {}) for p in served.parts] or [(route, usage)]:
            for kind in ("prompt_tokens", "completion_tokens"):
                if isinstance(used.get(kind), int):
                    m.tokens.labels(target, kind.removesuffix("_tokens")).inc(used[kind])
    if not state.audit.enabled:  # the record is built per request: skip it when nobody reads it
        return
    state.audit.write(
        {
            "time": time.time(),
            "request_id": prepared.call.request_id,
            "client": prepared.call.client,
            "model": prepared.features.model,
            "rule": prepared.decision.rule,
            "target": route,
            "served_model": served.model if served else None,
            "parts": [p.as_dict() for p in served.parts] if served else [],
            "fallbacks": [str(fb) for fb in served.fallbacks] if served else [],
            "hedge": {"source": served.hedge.source, "started": served.hedge.started, "won": served.hedge.winner}
            if served and served.hedge else None,
            "status": status,
            "stream": stream,
            "endpoint": endpoint,
            "sensitivity": prepared.features.sensitivity.level,
            "entities": prepared.features.sensitivity.counts,
            "redacted": bool(counts),
            "difficulty": prepared.features.difficulty.level,
            "latency_ms": round(elapsed * 1000, 2),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "error": usage.get("error"),
            **_audit_messages(state, prepared),
        }
    )


def _end_trace(prepared: Prepared, served: Served | None, status: int,
               usage: dict[str, Any]) -> None:
    """The request's span ends with what the audit line says, less anything of the text."""
    assert prepared.call.trace is not None
    f = prepared.features
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    prepared.call.trace.end(status, {
        "hybrid.route": served.target if served else ("deferred" if status == 202 else None),
        "hybrid.rule": prepared.decision.rule,
        "hybrid.connectivity": f.overall_connectivity,
        "hybrid.sensitivity": f.sensitivity.level,
        "hybrid.entities": sorted(f.sensitivity.counts),
        "hybrid.difficulty": f.difficulty.level,
        "hybrid.redactions": served.redactions if served else None,
        "hybrid.fallbacks": [str(fb) for fb in served.fallbacks] if served and served.fallbacks else None,
        "gen_ai.response.model": served.model if served else None,
        "gen_ai.usage.input_tokens": prompt if isinstance(prompt, int) else None,
        "gen_ai.usage.output_tokens": completion if isinstance(completion, int) else None,
    }, error=usage.get("error") if isinstance(usage.get("error"), str) else None)


def record_failed(state: GatewayState, prepared: Prepared, error: APIError, stream: bool,
                  endpoint: str = CHAT_ENDPOINT) -> None:
    """Count and audit a decided request no target could answer, and name it and its rule in the
    error's headers."""
    record(state, prepared, None, error.status, {"error": error.code}, stream, endpoint=endpoint)
    error.headers.setdefault("x-request-id", prepared.call.request_id)
    error.headers.setdefault("x-hybrid-rule", prepared.decision.rule)


def record_rejected(state: GatewayState, request_id: str, started: float, error: APIError,
                    client: str | None = None, model: str | None = None, stream: bool = False,
                    endpoint: str = CHAT_ENDPOINT) -> None:
    """Count and audit a request refused before any decision (bad JSON, auth, unknown model):
    route and rule are "-". Nothing of the body is written: it may not even be JSON. The error's
    headers name the request."""
    error.headers.setdefault("x-request-id", request_id)
    elapsed = time.monotonic() - started
    state.metrics.requests.labels("-", "-", str(error.status), endpoint).inc()
    state.metrics.latency.labels("-", str(stream).lower(), endpoint).observe(elapsed)
    if not state.audit.enabled:
        return
    state.audit.write({
        "time": time.time(), "request_id": request_id, "client": client,
        "model": model[:256] if isinstance(model, str) else None, "rule": "-", "target": "-",
        "fallbacks": [], "status": error.status, "stream": stream, "latency_ms": round(elapsed * 1000, 2),
        "error": error.code, "endpoint": endpoint,
    })


def _audit_messages(state: GatewayState, prepared: Prepared) -> dict[str, Any]:
    mode = state.settings.audit_prompts
    if mode == "off":
        return {}
    body = prepared.call.body
    if mode == "redacted":
        # Every detected value replaced, whatever its level and whatever the route (stricter than
        # what a cloud target gets), with a throwaway vault: placeholders are per audit line.
        body = redact_body(body, prepared.features.sensitivity, Vault(),
                           state.runtime.policy.privacy.model_copy(update={"redact_at_least": "low",
                                                                           "mode": "placeholder"}))
    return {"prompt_text": mode, "messages": body.get("messages")}
