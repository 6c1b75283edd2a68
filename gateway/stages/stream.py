"""A streamed answer, dispatch and restore chunk by chunk: `StreamRun` reads the target's chunks
under the stream deadline, restores them, notes the usage they report, resumes the answer on the
next target when one breaks mid-stream (gateway/resume.py), and charges it at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import structlog

from gateway import resume
from gateway.backends.base import BackendError, CallOptions
from gateway.dispatch import AllTargetsFailed, Fallback, Outcome, aclose_quietly
from gateway.runtime import Runtime
from gateway.stages.call import Prepared, Served
from gateway.stages.charge import charge
from gateway.stages.restore import StreamRestorers, restoring, stream_restorer
from gateway.stages.targets import TargetBodies
from gateway.stream_deadline import StreamDeadline
from gateway.wire.passthrough import NATIVE

log = structlog.get_logger("gateway.pipeline")


def stream_error(target: str, exc: BackendError) -> dict[str, Any]:
    return {
        "error": {
            "message": f"The upstream stream from {target} was interrupted ({exc.reason}).",
            "type": "upstream_error",
            "param": None,
            "code": "stream_interrupted",
        }
    }


class StreamRun:
    """One stream from its first target's outcome to its end. `served` says who wrote it so far
    (a resumed stream gains a part and a fallback); `usage` fills in as the targets report it."""

    def __init__(self, rt: Runtime, prepared: Prepared, first: Outcome, served: Served, bodies: TargetBodies,
                 opts: CallOptions) -> None:
        self.rt, self.prepared, self.first, self.bodies, self.opts = rt, prepared, first, bodies, opts
        self.served = served
        self.want_usage = bool((prepared.call.body.get("stream_options") or {}).get("include_usage"))
        self.usage: dict[str, Any] = {}
        self.partial = resume.Partial()
        self.marks = [0]  # where each part's text starts in what the client saw

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The restored chunks in chat's schema, for the route to write in its wire format; an
        interruption no target could resume arrives as an `{"error": ...}` dict."""
        current, partial = self.first, self.partial
        trace = self.prepared.call.trace
        # A stream is restored chunk by chunk: its restore span lasts as long as the stream.
        restore_span = trace.open("restore", **{"hybrid.stream": True}) \
            if trace is not None and restoring(self.rt, self.prepared, current.target) else None
        try:
            while True:
                resumed = current is not self.first
                restorer = stream_restorer(self.rt, self.prepared, current.target, native=not resumed)
                partial.raw_seen |= restorer is None
                try:
                    async for got in self._read(current):
                        chunk = resume.seamless(got, partial) if resumed else got
                        if chunk is None:
                            continue
                        for c in self._out(chunk, restorer):
                            partial.seen(c)
                            yield c
                    for c in restorer.flush() if restorer is not None else ():
                        partial.seen(c)
                        yield c
                    break
                except BackendError as exc:
                    log.warning("stream_interrupted", target=current.target, reason=exc.reason,
                                request_id=self.prepared.call.request_id)
                    # Text the restorer still holds (a placeholder cut by the break) is not sent:
                    # the next target goes on from what the client has actually seen.
                    nxt = await self._resume(current.target)
                    if nxt is None:
                        for c in restorer.flush() if restorer is not None else ():
                            yield c
                        # Tokens were already sent and no target can write the rest: end the stream
                        # with an error event the OpenAI SDK raises on, never a hung connection.
                        yield stream_error(current.target, exc)
                        self.usage["error"] = exc.reason
                        break
                    self._moved(current.target, nxt, exc.reason)
                    await aclose_quietly(current.rest)
                    current = nxt
        finally:
            await aclose_quietly(current.rest)
            if restore_span is not None:
                restore_span.end()
            ends = [*self.marks[1:], len(partial.text)]
            await charge(self.rt, self.prepared, self.served,
                         [end - start for start, end in zip(self.marks, ends, strict=True)])

    async def _read(self, current: Outcome) -> AsyncIterator[dict[str, Any]]:
        """A target's chunks: those already pulled, then the rest under the stream deadline."""
        for chunk in current.head:
            yield chunk
        rest = current.rest
        if rest is None:
            return
        # Stalls and slow drips end the stream here only where another target can resume it.
        guard = StreamDeadline(self.opts.deadline, self.prepared.decision.pace(current.target),
                               may_move=lambda: self._can_resume(current.target))
        try:
            while True:
                try:
                    chunk = await guard.next(rest)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise BackendError("timeout", "request deadline passed mid-stream") from None
                except BackendError:
                    raise
                except Exception as exc:  # end the stream cleanly whatever the backend raised
                    raise BackendError("protocol", f"unexpected {type(exc).__name__} mid-stream") from None
                yield chunk
        finally:
            guard.close()

    def _out(self, chunk: dict[str, Any], restorer: StreamRestorers | None) -> list[dict[str, Any]]:
        """A chunk as the client gets it: its usage noted (and sent only if asked for), restored."""
        if chunk.get("usage"):
            self.usage.update(chunk["usage"])
            self.served.parts[-1].usage = chunk["usage"]  # the part being streamed now
            if not chunk.get("choices") and NATIVE not in chunk:  # a pass-through's events go on
                return [chunk] if self.want_usage else []
            if not self.want_usage:
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return restorer.feed(chunk) if restorer is not None else [chunk]

    def _candidates(self, failed: str) -> tuple[str, ...]:
        return resume.candidates(self.prepared.decision.chain, failed, self.partial, policy=self.rt.policy,
                                 redacting=self.prepared.redacted is not None, is_engine=self.rt.is_engine)

    def _can_resume(self, failed: str) -> bool:
        return bool(self._candidates(failed))

    async def _resume(self, failed: str) -> Outcome | None:
        """The rest of the answer from the next target that can continue it, or None."""
        chain = self._candidates(failed)
        if not chain:
            return None
        rt, prepared, partial = self.rt, self.prepared, self.partial

        def body(target: str) -> dict[str, Any]:
            sees_redacted = prepared.redacted is not None and rt.policy.is_cloud(target)
            return resume.continuation_body(self.bodies.chat(target), partial, engine=rt.is_engine(target),
                                            vault=prepared.vault if sees_redacted else None)

        try:
            return await rt.dispatcher.stream(chain, body, self.opts, pace=prepared.decision.pace)
        except AllTargetsFailed as exc:
            log.warning("stream_resume_failed", reason=str(exc)[:200], request_id=prepared.call.request_id)
            return None

    def _moved(self, failed: str, nxt: Outcome, reason: str) -> None:
        """The answer goes on from `nxt`: one more fallback and one more part."""
        self.served.fallbacks.append(Fallback(failed, nxt.target, f"resumed_mid_stream:{reason}"))
        self.served.parts.append(nxt.part())
        self.marks.append(len(self.partial.text))
