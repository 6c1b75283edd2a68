"""One decoded request, from a route's side: prepare it, defer it or dispatch it, and record it
(gateway/respond.py) whatever happens. The chat, Messages and Responses routes read their wire
format in, call `answer`, and write what it returns out in their format; nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway import pipeline, respond
from gateway.deferred.job import Job
from gateway.dispatch import aclose_quietly
from gateway.policy.embeddings import Requested
from gateway.runtime import Runtime
from gateway.schema import APIError
from gateway.state import GatewayState


@dataclass
class Incoming:
    """What a route knows of a request before the pipeline has it: enough to count and audit one
    refused early (bad JSON, auth, a body its API rejects, an unknown model)."""

    state: GatewayState
    request_id: str
    endpoint: str
    started: float = field(default_factory=time.monotonic)
    client: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the body as read: its model and stream flag

    def rejected(self, exc: APIError) -> None:
        respond.record_rejected(self.state, self.request_id, self.started, exc, self.client, self.data.get("model"),
                                self.data.get("stream") is True, endpoint=self.endpoint)


@dataclass
class Deferred:
    """Accepted for later (202): cloud-only, deferrable, and the cloud unreachable."""

    prepared: pipeline.Prepared
    job: Job


@dataclass
class Whole:
    """A whole answer, recorded, with its `x-hybrid-*` headers."""

    prepared: pipeline.Prepared
    served: pipeline.Served
    response: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Streaming:
    """A stream whose first target answered; `events` writes it out and records it at its end."""

    incoming: Incoming
    prepared: pipeline.Prepared
    served: pipeline.Served
    chunks: AsyncIterator[dict[str, Any]]
    usage: dict[str, Any]
    headers: dict[str, str]

    async def events(self, convert: Callable[[dict[str, Any]], Iterable[bytes]],
                     finish: Callable[[], Iterable[bytes]]) -> AsyncIterator[bytes]:
        """The chunks in the route's format (`convert` each, then `finish`), the time to the first
        counted, the upstream closed and the request recorded however the stream ends."""
        state, served = self.incoming.state, self.served
        first = True
        try:
            async for chunk in self.chunks:
                if first:
                    state.metrics.ttft.labels(served.target).observe(time.monotonic() - self.prepared.call.started)
                    first = False
                for data in convert(chunk):
                    yield data
            for data in finish():
                yield data
        finally:
            await aclose_quietly(self.chunks)  # closes the upstream when the client left mid-stream
            respond.record(state, self.prepared, served, 200, self.usage, True, endpoint=self.incoming.endpoint)


async def answer(incoming: Incoming, rt: Runtime, call: pipeline.Call, *, stream: bool,
                 until_disconnect: Callable[[], Awaitable[None]], wire: str | None = None,
                 echo: dict[str, Any] | None = None) -> Deferred | Whole | Streaming:
    """`rt`: one runtime for the whole request, even if the policy reloads meanwhile.
    `until_disconnect` returns when the client hangs up (a whole answer is cancelled then).
    `wire`, `echo`: a Messages or Responses request's own shape, for its deferred job."""
    state = incoming.state
    try:
        prepared = await pipeline.prepare(rt, call, state.metrics)
        if state.deferred.wants(rt, prepared):
            pipeline.release_prepared(rt, prepared)  # charged when sent, not now
            job = await state.deferred.accept(rt, prepared, wire=wire, echo=echo)
            respond.record(state, prepared, None, 202, {}, False, endpoint=incoming.endpoint)
            return Deferred(prepared, job)
    except APIError as exc:
        incoming.rejected(exc)
        if call.trace is not None:
            call.trace.end(exc.status, {}, exc.code)
        raise
    try:
        if stream:
            chunks, served, usage = await pipeline.stream(rt, prepared)
        else:
            response, served = await watched(pipeline.complete(rt, prepared), until_disconnect)
    except APIError as exc:
        respond.record_failed(state, prepared, exc, stream, endpoint=incoming.endpoint)
        raise
    headers = respond.route_headers(prepared, served)
    if stream:
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        return Streaming(incoming, prepared, served, chunks, usage, headers)
    respond.record(state, prepared, served, 200, response.get("usage") or {}, False, endpoint=incoming.endpoint)
    return Whole(prepared, served, response, headers)


async def embeddings(incoming: Incoming, rt: Runtime, call: pipeline.Call, want: Requested,
                     dimensions: int | None, embed: pipeline.EmbedCall) -> Whole:
    """POST /v1/embeddings' request: decided as chat is (its inputs are the prompt), dispatched
    along the targets that may embed it (`embed` calls one); the caller records the answer."""
    state = incoming.state
    try:
        prepared = await pipeline.prepare(rt, call, state.metrics)
    except APIError as exc:
        incoming.rejected(exc)
        raise
    try:
        response, served = await pipeline.embed(rt, prepared, want, dimensions, embed)
    except APIError as exc:
        pipeline.release_prepared(rt, prepared)  # refused or failed: its budget hold goes
        respond.record_failed(state, prepared, exc, False, endpoint=incoming.endpoint)
        raise
    return Whole(prepared, served, response, respond.route_headers(prepared, served))


async def watched(work: Coroutine[Any, Any, Any], until_disconnect: Callable[[], Awaitable[None]]) -> Any:
    """`work`, cancelled as soon as the client hangs up. Nothing is sent until the answer is
    whole, so without watching the connection (the body is read; the next ASGI message is
    `http.disconnect`) an abandoned request ran to its end: a local engine generated every token
    for nobody. Cancelling the call reaches the backend (the engine stops within a step)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnect())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left (or this handler itself was cancelled)
            task.cancel()
            await asyncio.wait({task})  # let the backend's cleanup run before the request is recorded
    if not task.cancelled():
        return task.result()
    raise APIError(499, "The client closed the connection before the answer was ready.", code="cancelled")
