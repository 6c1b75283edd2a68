"""POST /v1/chat/completions and POST /v1/route/explain: OpenAI wire format in and out."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from gateway import explain, pipeline, respond, serve
from gateway.api import deferred
from gateway.api.deps import authenticate, get_state, request_id_of, state_of
from gateway.api.errors import error_response, json_object, unexpected_error, validation_error
from gateway.api.event_stream import EventStreamResponse, until_disconnect
from gateway.api.responses import JSON
from gateway.schema import APIError, ChatCompletionRequest, ErrorResponse
from gateway.state import GatewayState
from gateway.wire import openai_chat
from gateway.wire.embeddings import classify_body
from gateway.wire.openai_chat import SSE_DONE, sse

router = APIRouter()

MAX_JSON_DEPTH = 128  # deeper bodies are hostile; orjson also cannot re-serialise past 254 levels


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline pydantic's `$defs` so the schema is valid anywhere in the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _depth_exceeds(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline_defs(ChatCompletionRequest.model_json_schema())}},
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 503)
}


async def read_body(request: Request, state: GatewayState,
                    schema: type[BaseModel] | None = ChatCompletionRequest) -> dict[str, Any]:
    """Read and validate a JSON body under the size limit and a read deadline (slow clients).
    `schema`: the wire format's request model (another API's route passes its own)."""
    limits = state.runtime.policy.limits
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise APIError(413, f"Request body exceeds {limits.max_body_bytes} bytes.", code="body_too_large")
    chunks: list[bytes] = []
    size = 0

    async def consume() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise APIError(413, f"Request body exceeds {limits.max_body_bytes} bytes.", code="body_too_large")
            chunks.append(chunk)

    try:
        async with asyncio.timeout(limits.body_read_timeout_s):  # no extra task, unlike wait_for
            await consume()
    except TimeoutError:
        raise APIError(408, "Timed out reading the request body.", code="body_timeout") from None
    raw = b"".join(chunks)
    if not raw:
        raise APIError(400, "The request body is empty; expected JSON.", code="invalid_json")
    data = json_object(raw)
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise APIError(400, f"The request body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:  # before the costly validation
        raise APIError(400, f"Too many messages (limit {limits.max_messages}).", param="messages",
                       code="too_many_messages")
    try:
        if schema is not None:
            schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    return data


_KEY_HEADERS = frozenset({"authorization", "api-key", "x-api-key"})  # credentials never reach rules or logs


def _call(request: Request, body: dict[str, Any], client: str | None) -> pipeline.Call:
    headers = {k.lower(): v for k, v in request.headers.items() if k.lower() not in _KEY_HEADERS}
    request_id = request_id_of(request)
    tracing = state_of(request).tracing
    trace = tracing.request(request.url.path, body, request_id, client) if tracing is not None else None
    return pipeline.Call(body=body, headers=headers, client=client, request_id=request_id, trace=trace)


CHAT_PATH = "/v1/chat/completions"


@router.post(
    CHAT_PATH,
    openapi_extra=_BODY_SCHEMA,
    responses=_ERRORS,
    response_model=None,
)
async def chat_completions(request: Request) -> Response | EventStreamResponse:
    # Served by `serve_chat` (see gateway/app.py); the route stays registered for the OpenAPI
    # document. It calls its two dependencies itself for the same reason.
    state = state_of(request)
    incoming = serve.Incoming(state, request_id_of(request), CHAT_PATH)
    try:
        incoming.client = await authenticate(request)
        body = incoming.data = await read_body(request, state)
        call = _call(request, body, incoming.client)
    except APIError as exc:
        incoming.rejected(exc)
        raise
    result = await serve.answer(incoming, state.runtime, call, stream=bool(body.get("stream")),
                                until_disconnect=lambda: until_disconnect(request.receive))
    if isinstance(result, serve.Deferred):
        return deferred.accepted(state, result.prepared, result.job)
    prompt_tokens = result.prepared.features.prompt_tokens
    if isinstance(result, serve.Whole):
        answer, result.headers["x-hybrid-usage"] = openai_chat.completion(
            result.response, model=result.served.target, prompt_tokens=prompt_tokens)
        return JSON(answer, headers=result.headers)
    chunks = openai_chat.ChunkNormaliser(model=result.served.target, prompt_tokens=prompt_tokens,
                                         want_usage=bool((body.get("stream_options") or {}).get("include_usage")))

    def finish() -> list[bytes]:
        if (owed := chunks.finish()) is not None:  # the client asked for usage; no target sent it
            return [b": x-hybrid-usage: estimated\n\n" + sse(owed), SSE_DONE]
        return [SSE_DONE]

    return EventStreamResponse(result.events(lambda chunk: (sse(chunks.chunk(chunk)),), finish),
                               headers=result.headers)


async def serve_chat(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /v1/chat/completions as a bare ASGI app: the hot path skips FastAPI's router,
    dependency solver and middleware layers (~0.1 ms a request here, a tenth of what the gateway
    adds), with the same error shapes as the app's exception handlers."""
    request = Request(scope, receive)
    started = time.monotonic()
    try:
        response = await chat_completions(request)
    except APIError as exc:
        response = error_response(exc)
    except Exception as exc:
        response = unexpected_error(exc, CHAT_PATH)
        respond.record_rejected(state_of(request), request_id_of(request), started, APIError(500, "", code="internal_error"))
        response.headers["x-request-id"] = request_id_of(request)
    await response(scope, receive, send)


@router.post("/v1/route/explain", openapi_extra=_BODY_SCHEMA, responses=_ERRORS, response_model=None)
async def route_explain(
    request: Request,
    state: GatewayState = Depends(get_state),
    client: str | None = Depends(authenticate),
) -> Response:
    rt = state.runtime
    body = await read_body(request, state, schema=None)
    embedding: tuple[Any, Any] | None = None
    if explain.is_embeddings(body):  # POST /v1/embeddings' body: its decision, then its embedding plan
        embedding = explain.embeddings_request(body, rt.policy)
        body = classify_body(embedding[0], embedding[1].model)
    else:
        try:
            ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
    call = _call(request, body, client)
    return JSON(await explain.explain_call(rt, call, state.metrics, embedding), headers={"x-request-id": call.request_id})
