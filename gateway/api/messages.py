"""POST /v1/messages: Anthropic's Messages API, served by the same pipeline as chat completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.api.event_stream import EventStreamResponse
from gateway.api.wire_route import serve
from gateway.wire.anthropic_messages import PATH, AnthropicMessages

router = APIRouter()
_ADAPTER = AnthropicMessages()


@router.post(PATH, response_model=None)
async def create_message(request: Request) -> Response | EventStreamResponse:
    # Served by `serve_messages` (see gateway/app.py); registered for the OpenAPI document.
    return await serve(request, _ADAPTER)


async def serve_messages(scope: Scope, receive: Receive, send: Send) -> None:
    response = await serve(Request(scope, receive), _ADAPTER)
    await response(scope, receive, send)
