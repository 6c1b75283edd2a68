"""Builds the FastAPI app from Settings; the routes live in gateway/api.

The one piece of logic here: the generation endpoints (chat, Messages, Responses, embeddings)
are handed straight to their ASGI handlers, past FastAPI's router."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline-safe before any litellm import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gateway.api import chat, dashboard, deferred, embeddings, errors, messages, models, ops, responses_api
from gateway.api.usage import router as usage_router
from gateway.state import GatewayState, Settings

# The generation endpoints, served as bare ASGI apps: the hot paths skip FastAPI's router, and
# their streams (EventStreamResponse) are no FastAPI response type.
_DIRECT = {chat.CHAT_PATH: chat.serve_chat, messages.PATH: messages.serve_messages,
           responses_api.PATH: responses_api.serve_responses, embeddings.PATH: embeddings.serve_embeddings}


class GatewayApp(FastAPI):
    """FastAPI, with the generation hot paths handed straight to their handlers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and (direct := _DIRECT.get(scope["path"])):
            scope["app"] = self  # what Starlette sets for `request.app`
            await direct(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, state: GatewayState | None = None) -> FastAPI:
    gateway_state = state or GatewayState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway_state.start()
        try:
            yield
        finally:
            await gateway_state.stop()

    app = GatewayApp(title="Hybrid Gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway_state
    errors.install(app)
    for router in (chat.router, deferred.router, messages.router, responses_api.router, embeddings.router,
                   models.router, ops.router, dashboard.router, usage_router):
        app.include_router(router)
    return app
