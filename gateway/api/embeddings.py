"""POST /v1/embeddings: OpenAI's embeddings API, decided by the same policy as chat completions.

Read, classify and decide as chat does (the inputs are the prompt), narrow the rule's chain to the
targets that may embed this input in the space asked for (gateway/policy/embeddings.py), dispatch
with chat's retries and fallbacks, and answer one normalised `CreateEmbeddingResponse`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from gateway import pipeline, respond
from gateway.api.chat import _call, read_body
from gateway.api.deps import authenticate, request_id_of, state_of
from gateway.api.errors import error_response, unexpected_error
from gateway.api.responses import JSON
from gateway.api.wire_route import openapi_body
from gateway.backends.base import BackendError, CallOptions
from gateway.policy.embeddings import plan, requested
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


def _would_redact(prepared: pipeline.Prepared) -> bool:
    return prepared.redacted is not None and prepared.redacted != prepared.call.body


async def _serve(request: Request) -> Response:
    state = state_of(request)
    started = time.monotonic()
    request_id = request_id_of(request)
    client: str | None = None
    data: dict[str, Any] = {}
    try:
        client = await authenticate(request)
        data = await read_body(request, state, schema=None)
        req = _parse(data)
        rt = state.runtime  # one runtime for the whole request, even if the policy reloads meanwhile
        want = requested(rt.policy, req.model)
        prepared = await pipeline.prepare(rt, _call(request, classify_body(req, want.model), client), state.metrics)
    except APIError as exc:
        respond.record_rejected(state, request_id, started, exc, client, data.get("model"), endpoint=PATH)
        raise
    try:
        pipeline.refuse_blocked(prepared)
        chosen = plan(rt.policy, prepared.decision, want, would_redact=_would_redact(prepared),
                      dimensions=req.dimensions)
        # Nothing is redacted on this endpoint: the redaction prepare planned is never sent.
        prepared.redacted, prepared.vault = None, None

        async def call(target: str, opts: CallOptions) -> dict[str, Any]:
            emb = rt.policy.embeddings_of(target)
            backend = rt.backends[target]
            if emb is None or not backend.supports_embeddings:
                raise BackendError("invalid", f"{target} does not embed")
            return normalise(await backend.embed(upstream_body(req, emb.model), opts), req, target)

        result, served = await pipeline.embed(rt, prepared, chosen.chain, call, chosen.notes)
    except APIError as exc:
        pipeline.release_prepared(rt, prepared)  # refused or failed: its budget hold goes
        respond.record_failed(state, prepared, exc, False, endpoint=PATH)
        raise
    headers = respond.route_headers(prepared, served)
    headers["x-hybrid-embedding-space"] = _space(rt, served.target)
    headers["x-hybrid-usage"] = "estimated" if result["usage_estimated"] else "reported"
    body = response(result, req.encoding_format)
    respond.record(state, prepared, served, 200, {} if result["usage_estimated"] else body["usage"], False,
                   endpoint=PATH)  # metrics count reported tokens only, as for chat
    return JSON(body, headers=headers)


def _space(rt: Runtime, target: str) -> str:
    emb = rt.policy.embeddings_of(target)
    return emb.space_name if emb is not None else "-"


async def serve(request: Request) -> Response:
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
    return await serve(request)


async def serve_embeddings(scope: Scope, receive: Receive, send: Send) -> None:
    response_ = await serve(Request(scope, receive))
    await response_(scope, receive, send)
