"""POST /v1/embeddings: OpenAI's embeddings API, decided by the same policy as chat completions.

Read, classify and decide as chat does (the inputs are the prompt), narrow the rule's chain to the
targets that may embed this input in the space asked for (gateway/policy/embeddings.py), dispatch
with chat's retries and fallbacks, and answer one normalised `CreateEmbeddingResponse`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from gateway import respond, serve
from gateway.api.chat import _call, read_body
from gateway.api.deps import authenticate, request_id_of, state_of
from gateway.api.errors import error_response, unexpected_error
from gateway.api.responses import JSON
from gateway.api.wire_route import openapi_body
from gateway.backends.base import BackendError, CallOptions
from gateway.policy.embeddings import requested
from gateway.runtime import Runtime
from gateway.schema import APIError, ErrorResponse
from gateway.wire.base import invalid
from gateway.wire.embeddings import PATH, EmbeddingsRequest, classify_body, normalise, response, upstream_body

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 503)}


def _parse(data: dict[str, Any]) -> EmbeddingsRequest:
    try:
        return EmbeddingsRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None


async def _serve(request: Request) -> Response:
    state = state_of(request)
    incoming = serve.Incoming(state, request_id_of(request), PATH)
    try:
        incoming.client = await authenticate(request)
        incoming.data = await read_body(request, state, schema=None)
        req = _parse(incoming.data)
        rt = state.runtime  # one runtime for the whole request, even if the policy reloads meanwhile
        want = requested(rt.policy, req.model)
        call = _call(request, classify_body(req, want.model), incoming.client)
    except APIError as exc:
        incoming.rejected(exc)
        raise

    async def embed(target: str, opts: CallOptions) -> dict[str, Any]:
        emb = rt.policy.embeddings_of(target)
        backend = rt.backends[target]
        if emb is None or not backend.supports_embeddings:
            raise BackendError("invalid", f"{target} does not embed")
        return normalise(await backend.embed(upstream_body(req, emb.model), opts), req, target)

    result = await serve.embeddings(incoming, rt, call, want, req.dimensions, embed)
    headers = result.headers
    headers["x-hybrid-embedding-space"] = _space(rt, result.served.target)
    estimated = result.response["usage_estimated"]
    headers["x-hybrid-usage"] = "estimated" if estimated else "reported"
    body = response(result.response, req.encoding_format)
    respond.record(state, result.prepared, result.served, 200, {} if estimated else body["usage"], False,
                   endpoint=PATH)  # metrics count reported tokens only, as for chat
    return JSON(body, headers=headers)


def _space(rt: Runtime, target: str) -> str:
    emb = rt.policy.embeddings_of(target)
    return emb.space_name if emb is not None else "-"


async def handle(request: Request) -> Response:
    try:
        return await _serve(request)
    except APIError as exc:
        return error_response(exc)
    except Exception as exc:
        response_ = unexpected_error(exc, PATH)
        response_.headers["x-request-id"] = request_id_of(request)
        return response_


@router.post(PATH, openapi_extra=openapi_body(EmbeddingsRequest), responses=_ERRORS, response_model=None)
async def create_embeddings(request: Request) -> Response:
    # Served by `serve_embeddings` (see gateway/app.py); registered for the OpenAPI document.
    return await handle(request)


async def serve_embeddings(scope: Scope, receive: Receive, send: Send) -> None:
    response_ = await handle(Request(scope, receive))
    await response_(scope, receive, send)
