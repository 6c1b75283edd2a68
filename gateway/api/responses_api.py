"""POST /v1/responses: OpenAI's Responses API (stateless), served by the chat-completions pipeline."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.api.event_stream import EventStreamResponse
from gateway.api.wire_route import openapi_body, serve
from gateway.schema import ErrorResponse
from gateway.wire.openai_responses import PATH, OpenAIResponses, ResponsesRequest

router = APIRouter()
_ADAPTER = OpenAIResponses()
_BODY_SCHEMA = openapi_body(ResponsesRequest)
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 503)}


@router.post(PATH, openapi_extra=_BODY_SCHEMA, responses=_ERRORS, response_model=None)
async def create_response(request: Request) -> Response | EventStreamResponse:
    # Served by `serve_responses` (see gateway/app.py); registered for the OpenAPI document.
    return await serve(request, _ADAPTER)


async def serve_responses(scope: Scope, receive: Receive, send: Send) -> None:
    response = await serve(Request(scope, receive), _ADAPTER)
    await response(scope, receive, send)
