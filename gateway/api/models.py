"""GET /v1/models: the policy's targets and aliases, plus `auto`.

One answer for both SDKs: each entry has OpenAI's fields (`object`, `created`, `owned_by`) and
Anthropic's (`type`, `display_name`, `created_at`, `lifecycle`), and the list carries Anthropic's
page fields (`has_more`, `first_id`, `last_id`); each SDK reads its own and ignores the others.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends

from gateway.api.deps import authenticate, get_state
from gateway.api.responses import JSON
from gateway.state import GatewayState

router = APIRouter()
_CREATED = int(time.time())
_CREATED_AT = datetime.fromtimestamp(_CREATED, UTC).isoformat().replace("+00:00", "Z")


def _entry(model_id: str, hybrid: dict[str, Any]) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _CREATED, "owned_by": "hybrid-gateway",
            "type": "model", "display_name": model_id, "created_at": _CREATED_AT, "lifecycle": "active",
            "hybrid": hybrid}


@router.get("/v1/models")
async def list_models(state: GatewayState = Depends(get_state), _: str | None = Depends(authenticate)) -> JSON:
    policy = state.runtime.policy
    data = [_entry("auto", {"kind": "policy"})]
    for name, target in policy.targets.items():
        data.append(_entry(name, {"kind": target.kind, "state": state.runtime.monitor.state(name)
                                  if target.kind == "cloud" else "local"}))
    for alias, to in policy.aliases.items():
        data.append(_entry(alias, {"kind": "alias", "target": to}))
    return JSON({"object": "list", "data": data, "has_more": False, "first_id": data[0]["id"],
                 "last_id": data[-1]["id"]})
