"""POST /v1/messages: Anthropic's Messages API, served by the same pipeline as chat completions."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.wire_route import wire_route
from gateway.wire.anthropic_messages import ANTHROPIC_MESSAGES, PATH, ErrorResponse

__all__ = ["PATH", "router", "serve_messages"]

router = APIRouter()
serve_messages = wire_route(router, ANTHROPIC_MESSAGES, ErrorResponse, name="create_message")
