"""Operations: health, readiness, metrics, and the admin connectivity switch."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

from gateway.api.deps import get_state, require_admin
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


@router.post("/admin/connectivity", dependencies=[Depends(require_admin)])
async def force_connectivity(req: ConnectivityForce, state: GatewayState = Depends(get_state)) -> JSON:
    monitor = state.runtime.monitor
    names = [req.target] if req.target else list(monitor.health)
    for name in names:
        if name not in monitor.health:
            raise APIError(404, f"No cloud target named {name!r}.", param="target", code="unknown_target")
        monitor.force(name, req.force)
    return JSON({"targets": monitor.snapshot()})


@router.get("/admin/connectivity", dependencies=[Depends(require_admin)])
async def connectivity(state: GatewayState = Depends(get_state)) -> JSON:
    monitor = state.runtime.monitor
    return JSON({
        name: {"state": h.effective, "measured": h.state, "force": h.force, "failures": h.failures,
               "successes": h.successes, "last_error": h.last_error, "probes": h.probes}
        for name, h in monitor.health.items()
    })
