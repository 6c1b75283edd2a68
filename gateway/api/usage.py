"""GET /v1/usage (the calling client's usage and budget this period, by its own key) and
GET /admin/usage (every client's), from the state store: the same figures on every replica."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from gateway.api.deps import authenticate, get_state, request_id_of, require_admin
from gateway.api.responses import JSON
from gateway.schema import APIError, ErrorResponse
from gateway.state import GatewayState

router = APIRouter()

_NO_CLIENTS = "Usage is counted per client, and this gateway's policy declares no `clients`."


@router.get("/v1/usage", responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
async def own_usage(request: Request, state: GatewayState = Depends(get_state),
                    client: str | None = Depends(authenticate)) -> JSON:
    budgets = state.runtime.budgets
    if client is None or budgets is None:
        raise APIError(404, _NO_CLIENTS, code="usage_not_counted")
    return JSON(await budgets.usage(client), headers={"x-request-id": request_id_of(request),
                                                      "Cache-Control": "no-store"})


@router.get("/admin/usage", dependencies=[Depends(require_admin)])
async def all_usage(state: GatewayState = Depends(get_state)) -> JSON:
    budgets = state.runtime.budgets
    if budgets is None:
        raise APIError(404, _NO_CLIENTS, code="usage_not_counted")
    return JSON(await budgets.all_usage(), headers={"Cache-Control": "no-store"})
