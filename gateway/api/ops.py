"""Operations: health, readiness, metrics, the admin connectivity switch and policy reload
(both fleet-wide on a shared state store)."""

from __future__ import annotations

from typing import Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.api.deps import get_state, require_admin
from gateway.api.errors import json_object, validation_error
from gateway.api.responses import JSON
from gateway.schema import APIError
from gateway.state import GatewayState

router = APIRouter()


@router.get("/healthz")
async def healthz() -> JSON:
    return JSON({"status": "ok"})


@router.get("/readyz")
async def readyz(state: GatewayState = Depends(get_state)) -> JSON:
    ready, targets = state.runtime.ready()
    body = {"status": "ready" if ready else "not_ready", "policy": state.runtime.source, "targets": targets,
            "policy_error": state.policy_error}
    return JSON(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(state: GatewayState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class ConnectivityForce(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str | None = None  # None: every cloud target
    force: Literal["online", "offline", "auto"]


_MAX_ADMIN_BODY = 4096
M = TypeVar("M", bound=BaseModel)


async def json_body(request: Request, model: type[M]) -> M:
    """The body as JSON whatever its content type: curl's `-d` sends
    application/x-www-form-urlencoded, and the chat route takes that as JSON too."""
    raw = await request.body()
    if len(raw) > _MAX_ADMIN_BODY:
        raise APIError(413, f"Request body exceeds {_MAX_ADMIN_BODY} bytes.", code="body_too_large")
    data = json_object(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


_FORCE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ConnectivityForce.model_json_schema()}}}}


@router.post("/admin/connectivity", dependencies=[Depends(require_admin)], openapi_extra=_FORCE_BODY)
async def force_connectivity(request: Request, state: GatewayState = Depends(get_state)) -> JSON:
    req = await json_body(request, ConnectivityForce)
    monitor = state.runtime.monitor
    names = [req.target] if req.target else list(monitor.health)
    for name in names:
        if name not in monitor.health:
            raise APIError(404, f"No cloud target named {name!r}.", param="target", code="unknown_target")
    for name in names:
        monitor.force(name, req.force)
    # Every replica sharing the state store follows (pub/sub); `fleet` false: this one only.
    fleet = await state.broadcast_force(req.target, req.force) if state.runtime.store.shared else False
    return JSON({"targets": monitor.snapshot(), "fleet": fleet})


@router.post("/admin/reload", dependencies=[Depends(require_admin)])
async def reload_policy(state: GatewayState = Depends(get_state)) -> JSON:
    """Reload the policy file here and on every replica sharing the state store (`fleet`); each
    validates its own file and keeps its last good policy on an error (`/readyz` policy_error)."""
    ok, fleet = await state.reload_fleet()
    return JSON({"reloaded": ok, "policy_error": state.policy_error, "fleet": fleet},
                status_code=200 if ok else 422)


@router.get("/admin/connectivity", dependencies=[Depends(require_admin)])
async def connectivity(state: GatewayState = Depends(get_state)) -> JSON:
    monitor = state.runtime.monitor
    return JSON({
        name: {"state": h.effective, "measured": h.state, "force": h.force, "failures": h.failures,
               "successes": h.successes, "last_error": h.last_error, "probes": h.probes}
        for name, h in monitor.health.items()
    })
