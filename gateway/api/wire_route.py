"""One handler for every wire format other than chat completions: read, convert in, run the
pipeline exactly as the chat route does, convert out, and answer errors in the format's shape."""

from __future__ import annotations

import dataclasses
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import pipeline
from gateway import serve as serving
from gateway.api import deferred
from gateway.api.chat import _call, _inline_defs, read_body
from gateway.api.deps import authenticate, request_id_of, state_of
from gateway.api.errors import validation_error
from gateway.api.event_stream import EventStreamResponse, until_disconnect
from gateway.api.responses import JSON
from gateway.deferred import wire as deferred_wire
from gateway.schema import APIError, ChatCompletionRequest
from gateway.state import GatewayState
from gateway.wire import openai_chat
from gateway.wire.base import WireAdapter, sse_event
from gateway.wire.passthrough import NATIVE, Passthrough, internal

log = structlog.get_logger("gateway.api")


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its request model as the JSON body (the handlers read the body
    themselves, so FastAPI does not know it)."""
    schema = _inline_defs(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def wire_route(router: APIRouter, adapter: WireAdapter[Any], error_model: type[BaseModel], name: str) -> ASGIApp:
    """Registers the adapter's POST route on `router` for the OpenAPI document, and returns the
    ASGI handler gateway/app.py serves it with (past FastAPI's routing)."""
    errors: dict[int | str, dict[str, Any]] = {s: {"model": error_model} for s in (400, 401, 403, 404, 413, 503)}

    async def endpoint(request: Request) -> Response | EventStreamResponse:
        return await serve(request, adapter)

    router.add_api_route(adapter.endpoint, endpoint, methods=["POST"], name=name,
                         openapi_extra=openapi_body(adapter.request_model), responses=errors, response_model=None)

    async def direct(scope: Scope, receive: Receive, send: Send) -> None:
        response = await serve(Request(scope, receive), adapter)
        await response(scope, receive, send)

    return direct


async def serve(request: Request, adapter: WireAdapter[Any]) -> Response | EventStreamResponse:
    try:
        return await _serve(request, adapter)
    except APIError as exc:
        return JSON(adapter.error_body(exc), status_code=exc.status, headers=exc.headers)
    except Exception as exc:
        log.error("unhandled_error", error=type(exc).__name__, path=adapter.endpoint)  # the type only
        err = APIError(500, "Internal error in the gateway.", code="internal_error",
                       headers={"x-request-id": request_id_of(request)})
        return JSON(adapter.error_body(err), status_code=err.status)


def _checked(state: GatewayState, body: dict[str, Any]) -> None:
    """The converted body holds to the chat route's own limits and model."""
    limit = state.runtime.policy.limits.max_messages
    if len(body["messages"]) > limit:
        raise APIError(400, f"Too many messages (limit {limit}).", param="messages", code="too_many_messages")
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def _serve(request: Request, adapter: WireAdapter[Any]) -> Response | EventStreamResponse:
    state = state_of(request)
    incoming = serving.Incoming(state, request_id_of(request), adapter.endpoint)
    try:
        incoming.client = await authenticate(request)
        data = incoming.data = await read_body(request, state, schema=None)
        req = adapter.parse(data)
        body = adapter.to_chat(req)
        _checked(state, body)
        call = _call(request, body, incoming.client)
        if adapter.api is not None:  # the client's own body too, for a target of its API
            call = dataclasses.replace(call, passthrough=Passthrough(adapter.api, data))
    except APIError as exc:
        incoming.rejected(exc)
        raise
    rt = state.runtime  # one runtime for the whole request, even if the policy reloads meanwhile
    result = await serving.answer(incoming, rt, call, stream=bool(body.get("stream")),
                                  until_disconnect=lambda: until_disconnect(request.receive),
                                  wire=adapter.endpoint, echo=deferred_wire.echo_of(data))
    if isinstance(result, serving.Deferred):
        return deferred.accepted(state, result.prepared, result.job)
    prompt_tokens = result.prepared.features.prompt_tokens
    if isinstance(result, serving.Whole):
        if isinstance(native := result.response.get(NATIVE), dict):  # the upstream's own answer, restored
            result.headers["x-hybrid-usage"] = "reported"
            return JSON(adapter.native_answer(native, req), headers=result.headers)
        # Rebuilt to chat's schema first, so the adapter reads one shape whoever answered.
        answer, result.headers["x-hybrid-usage"] = openai_chat.completion(
            result.response, model=result.served.target, prompt_tokens=prompt_tokens)
        return JSON(adapter.from_chat(answer, req), headers=result.headers)
    target = result.served.target
    translator = adapter.translator(req, await pipeline.prompt_tokens(rt, result.prepared, target),
                                    incoming.request_id)
    normalised = openai_chat.ChunkNormaliser(model=target, prompt_tokens=prompt_tokens, want_usage=True)

    def convert(chunk: dict[str, Any]) -> list[bytes]:
        # A pass-through's chunk goes as it is (its events say the answer); another is
        # normalised to chat's schema, its internal parts put back.
        return [sse_event(e) for e in translator.feed(chunk if NATIVE in chunk
                                                      else {**normalised.chunk(chunk), **internal(chunk)})]

    def finish() -> list[bytes]:
        owed = normalised.finish()  # no target reported usage: estimated
        return [sse_event(e) for e in (*(translator.feed(owed) if owed is not None else ()), *translator.finish())]

    return EventStreamResponse(result.events(convert, finish), headers=result.headers)
