"""POST /v1/responses: OpenAI's Responses API (stateless), served by the chat-completions pipeline."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.api.event_stream import EventStreamResponse
from gateway.api.wire_route import serve
from gateway.wire.openai_responses import PATH, OpenAIResponses

router = APIRouter()
_ADAPTER = OpenAIResponses()


@router.post(PATH, response_model=None)
async def create_response(request: Request) -> Response | EventStreamResponse:
    # Served by `serve_responses` (see gateway/app.py); registered for the OpenAPI document.
    return await serve(request, _ADAPTER)


async def serve_responses(scope: Scope, receive: Receive, send: Send) -> None:
    response = await serve(Request(scope, receive), _ADAPTER)
    await response(scope, receive, send)
