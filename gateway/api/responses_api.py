"""POST /v1/responses: OpenAI's Responses API (stateless), served by the chat-completions pipeline."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.wire_route import wire_route
from gateway.schema import ErrorResponse
from gateway.wire.openai_responses import OPENAI_RESPONSES, PATH

__all__ = ["PATH", "router", "serve_responses"]

router = APIRouter()
serve_responses = wire_route(router, OPENAI_RESPONSES, ErrorResponse, name="create_response")
