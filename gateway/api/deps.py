"""Explicit dependencies for the routes (FastAPI `Depends`): the state and the caller's identity."""

from __future__ import annotations

import hmac
import uuid

from fastapi import Request

from gateway.schema import APIError
from gateway.state import GatewayState


def state_of(request: Request) -> GatewayState:
    return request.app.state.gateway


def request_id_of(request: Request) -> str:
    """The client's `x-request-id`, or a new one; the same for the whole request (it is kept in
    the ASGI scope, so an error raised before the pipeline starts still carries it)."""
    rid = request.scope.get("hybrid.request_id")
    if rid is None:
        sent = request.headers.get("x-request-id", "")
        # Echoed in a header and written to logs: keep it short and printable.
        rid = sent[:128] if sent and sent.isprintable() else uuid.uuid4().hex
        request.scope["hybrid.request_id"] = rid
    return rid


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in its thread
# pool, a hand-off that cost ~0.3 ms p50 and 16% of throughput on every request.
async def get_state(request: Request) -> GatewayState:
    return state_of(request)


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    # `x-api-key`: what the anthropic SDK sends.
    return request.headers.get("api-key") or request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> str | None:
    """The client's name from its API key; None when the policy declares no clients (no auth)."""
    clients = state_of(request).runtime.policy.clients
    if clients is None:
        return None
    token = _bearer(request)
    if token is None:
        raise APIError(401, "Missing API key: send `Authorization: Bearer <key>`.", code="missing_api_key")
    for client in clients:
        if hmac.compare_digest(client.api_key.encode(), token.encode()):
            return client.name
    raise APIError(401, "Invalid API key.", code="invalid_api_key")


async def require_admin(request: Request) -> None:
    key = state_of(request).settings.admin_key
    if not key:
        raise APIError(404, "Admin endpoints are disabled (set GATEWAY_ADMIN_KEY).", code="not_found")
    token = _bearer(request)
    if token is None or not hmac.compare_digest(key.encode(), token.encode()):
        raise APIError(401, "Invalid admin key.", code="invalid_api_key")
