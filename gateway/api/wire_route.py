"""One handler for every wire format other than chat completions: read, convert in, run the
pipeline exactly as the chat route does, convert out, and answer errors in the format's shape."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import pipeline, respond
from gateway.api import deferred
from gateway.api.chat import (
    _call,
    _inline_defs,
    complete_watched,
    read_body,
)
from gateway.api.deps import authenticate, request_id_of, state_of
from gateway.api.errors import validation_error
from gateway.api.event_stream import EventStreamResponse
from gateway.api.responses import JSON
from gateway.deferred import wire as deferred_wire
from gateway.dispatch import aclose_quietly
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


def wire_route(router: APIRouter, adapter: WireAdapter, error_model: type[BaseModel], name: str) -> ASGIApp:
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


async def serve(request: Request, adapter: WireAdapter) -> Response | EventStreamResponse:
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


async def _serve(request: Request, adapter: WireAdapter) -> Response | EventStreamResponse:
    state = state_of(request)
    started = time.monotonic()
    request_id = request_id_of(request)
    client: str | None = None
    data: dict[str, Any] = {}
    try:
        client = await authenticate(request)
        data = await read_body(request, state, schema=None)
        req = adapter.parse(data)
        body = adapter.to_chat(req)
        _checked(state, body)
        rt = state.runtime  # one runtime for the whole request, even if the policy reloads meanwhile
        call = _call(request, body, client)
        if adapter.api is not None:  # the client's own body too, for a target of its API
            call = dataclasses.replace(call, passthrough=Passthrough(adapter.api, data))
        prepared = await pipeline.prepare(rt, call, state.metrics)
        if state.deferred.wants(rt, prepared):  # cloud-only, marked deferrable, and the cloud unreachable
            pipeline.release_prepared(rt, prepared)  # charged when sent, not now
            job = await state.deferred.accept(rt, prepared, wire=adapter.endpoint, echo=deferred_wire.echo_of(data))
            respond.record(state, prepared, None, 202, {}, False, endpoint=adapter.endpoint)
            return deferred.accepted(state, prepared, job)
    except APIError as exc:
        respond.record_rejected(state, request_id, started, exc, client, data.get("model"),
                                data.get("stream") is True, endpoint=adapter.endpoint)
        raise
    streaming = bool(body.get("stream"))
    try:
        if streaming:
            chunks, served, usage = await pipeline.stream(rt, prepared, encoded=False)
        else:
            response, served = await complete_watched(request, rt, prepared)
    except APIError as exc:
        respond.record_failed(state, prepared, exc, streaming, endpoint=adapter.endpoint)
        raise
    headers = respond.route_headers(prepared, served)
    if not streaming:
        respond.record(state, prepared, served, 200, response.get("usage") or {}, False, endpoint=adapter.endpoint)
        if isinstance(native := response.get(NATIVE), dict):  # the upstream's own answer, restored
            headers["x-hybrid-usage"] = "reported"
            return JSON(adapter.native_answer(native, req), headers=headers)
        # Rebuilt to chat's schema first, so the adapter reads one shape whoever answered.
        answer, headers["x-hybrid-usage"] = openai_chat.completion(
            response, model=served.target, prompt_tokens=prepared.features.prompt_tokens)
        return JSON(adapter.from_chat(answer, req), headers=headers)
    translator = adapter.translator(req, await pipeline.prompt_tokens(rt, prepared, served.target), request_id)
    normalised = openai_chat.ChunkNormaliser(model=served.target, prompt_tokens=prepared.features.prompt_tokens,
                                             want_usage=True)

    async def events() -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in chunks:
                if first:
                    state.metrics.ttft.labels(served.target).observe(time.monotonic() - prepared.call.started)
                    first = False
                # A pass-through's chunk goes as it is (its events say the answer); another is
                # normalised to chat's schema, its internal parts put back.
                for event in translator.feed(chunk if NATIVE in chunk
                                             else {**normalised.chunk(chunk), **internal(chunk)}):
                    yield sse_event(event)
            if (owed := normalised.finish()) is not None:  # no target reported usage: estimated
                for event in translator.feed(owed):
                    yield sse_event(event)
            for event in translator.finish():
                yield sse_event(event)
        finally:
            await aclose_quietly(chunks)  # closes the upstream when the client left mid-stream
            respond.record(state, prepared, served, 200, usage, True, endpoint=adapter.endpoint)

    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    return EventStreamResponse(events(), headers=headers)
