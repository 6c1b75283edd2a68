"""POST /v1/responses: OpenAI's Responses API (stateless), served by the chat-completions pipeline."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.wire_route import wire_route
from gateway.schema import ErrorResponse
from gateway.wire.openai_responses import PATH, OpenAIResponses

__all__ = ["PATH", "router", "serve_responses"]

router = APIRouter()
serve_responses = wire_route(router, OpenAIResponses(), ErrorResponse, name="create_response")
