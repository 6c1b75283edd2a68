"""POST /v1/messages: Anthropic's Messages API, served by the same pipeline as chat completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.api.event_stream import EventStreamResponse
from gateway.api.wire_route import openapi_body, serve
from gateway.wire.anthropic_messages import PATH, AnthropicMessages, ErrorResponse, MessagesRequest

router = APIRouter()
_ADAPTER = AnthropicMessages()
_BODY_SCHEMA = openapi_body(MessagesRequest)
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 503)}


@router.post(PATH, openapi_extra=_BODY_SCHEMA, responses=_ERRORS, response_model=None)
async def create_message(request: Request) -> Response | EventStreamResponse:
    # Served by `serve_messages` (see gateway/app.py); registered for the OpenAPI document.
    return await serve(request, _ADAPTER)


async def serve_messages(scope: Scope, receive: Receive, send: Send) -> None:
    response = await serve(Request(scope, receive), _ADAPTER)
    await response(scope, receive, send)
