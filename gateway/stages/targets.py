"""The dispatch stage's inputs: the body each target is sent, the call's options, and the
errors a dispatch that found no target ends in."""

from __future__ import annotations

import math
from typing import Any

from gateway.backends.base import CallOptions
from gateway.dispatch import AllTargetsFailed
from gateway.policy.evaluate import Decision
from gateway.runtime import Runtime
from gateway.schema import APIError
from gateway.stages.call import Call, Prepared
from gateway.stages.classify import without_images
from gateway.wire.passthrough import NATIVE, NativeAPI


def passthrough_api(rt: Runtime, prepared: Prepared, target: str) -> NativeAPI | None:
    """The API `target` is sent the client's own body in (it speaks the client's API), or None."""
    pt = prepared.call.passthrough
    if pt is None or rt.policy.targets[target].api != pt.api:
        return None
    if prepared.features.has_images and not rt.policy.takes_images(target):
        return None  # translated, so the images can be dropped
    return pt.api


class TargetBodies:
    """The body each target of one dispatch receives (the dispatcher asks per attempt), and the
    warnings that says what it had to leave out (x-hybrid-warning)."""

    def __init__(self, rt: Runtime, prepared: Prepared) -> None:
        self.rt = rt
        self.prepared = prepared
        self.warnings: list[str] = []

    def __call__(self, target: str) -> dict[str, Any]:
        return self.body(target)

    def chat(self, target: str) -> dict[str, Any]:
        """The body in chat's own format, even for a target of the client's API (a resumed
        answer's continuation is written in chat)."""
        return self.body(target, native=False)

    def body(self, target: str, native: bool = True) -> dict[str, Any]:
        """Redacted for the cloud when the rule says so, without what the target cannot take, and
        for the engine under the engine's model name (which it answers with). A target of the
        client's own API also gets the client's body (`native`)."""
        rt, prepared = self.rt, self.prepared
        redacting = prepared.redacted is not None and rt.policy.is_cloud(target)
        body = prepared.redacted if redacting and prepared.redacted is not None else prepared.call.body
        if native and prepared.call.passthrough is not None and passthrough_api(rt, prepared, target) is not None:
            return {**body, NATIVE: prepared.native_redacted if redacting else prepared.call.passthrough.body}
        if prepared.features.has_images and not rt.policy.takes_images(target):
            body, n = without_images(body)
            self._warn(f"{target} cannot take images: {n} image part{'s' if n != 1 else ''} dropped")
        if rt.is_engine(target):  # tools and response_format included: the engine decodes under a grammar
            body = {**body, "model": rt.engine_model(target)}
        return body

    def _warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)


def options(rt: Runtime, call: Call) -> CallOptions:
    return CallOptions(deadline=call.started + rt.policy.limits.request_timeout_s, request_id=call.request_id,
                       trace=call.trace)


def all_failed_error(exc: AllTargetsFailed, decision: Decision | None = None) -> APIError:
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
