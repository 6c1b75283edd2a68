"""GET /v1/models: the policy's targets and aliases, plus `auto`."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from gateway.api.deps import authenticate, get_state
from gateway.api.responses import JSON
from gateway.state import GatewayState

router = APIRouter()
_CREATED = int(time.time())


@router.get("/v1/models")
async def list_models(state: GatewayState = Depends(get_state), _: str | None = Depends(authenticate)) -> JSON:
    policy = state.runtime.policy
    data = [{"id": "auto", "object": "model", "created": _CREATED, "owned_by": "hybrid-gateway",
             "hybrid": {"kind": "policy"}}]
    for name, target in policy.targets.items():
        data.append({"id": name, "object": "model", "created": _CREATED, "owned_by": "hybrid-gateway",
                     "hybrid": {"kind": target.kind, "state": state.runtime.monitor.state(name)
                                if target.kind == "cloud" else "local"}})
    for alias, to in policy.aliases.items():
        data.append({"id": alias, "object": "model", "created": _CREATED, "owned_by": "hybrid-gateway",
                     "hybrid": {"kind": "alias", "target": to}})
    return JSON({"object": "list", "data": data})
