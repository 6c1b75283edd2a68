"""Deferred requests that came in on Anthropic Messages or OpenAI Responses: what of the request a
job keeps to answer in that API's shape, and the job as that API shows it.

A job stores the request as the pipeline saw it (chat-shaped, redacted) plus an *echo*: the wire
request without its prompt-bearing fields (messages, system, input, instructions, metadata), so
the stored job holds no raw value. The answer, restored, goes back through the adapter's own
`from_chat` with a request rebuilt from the echo.
"""

from __future__ import annotations

from typing import Any

from gateway.deferred.job import Job
from gateway.wire import anthropic_messages, openai_responses
from gateway.wire.base import WireAdapter

MESSAGES = anthropic_messages.PATH
RESPONSES = openai_responses.PATH

# Never stored: they carry the prompt (redacted in the job's body already) or free text that may
# name a person (`user` is often an email).
_PROMPT_FIELDS = frozenset({"messages", "system", "input", "instructions", "metadata", "user", "stream"})
# Enough for the adapter to parse the echo back into its request type (the prompt is not read).
_STUB: dict[str, dict[str, Any]] = {MESSAGES: {"messages": [{"role": "user", "content": "-"}]},
                                    RESPONSES: {"input": "-"}}
_ADAPTERS: dict[str, WireAdapter[Any]] = {MESSAGES: anthropic_messages.ANTHROPIC_MESSAGES,
                                     RESPONSES: openai_responses.OPENAI_RESPONSES}
# A job's status as a Response object's.
_RESPONSE_STATUS = {"queued": "queued", "in_progress": "in_progress", "completed": "completed", "failed": "failed"}


def echo_of(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in _PROMPT_FIELDS}


def _request(job: Job) -> Any:
    assert job.wire is not None
    return _ADAPTERS[job.wire].parse({**(job.echo or {}), **_STUB[job.wire], "stream": False})


def view(job: Job, envelope: dict[str, Any], response: dict[str, Any] | None) -> dict[str, Any]:
    """The job in its API's shape: for Responses, a Response object (`background: true`, the
    job's id, status queued / in_progress / completed / failed), as GET /v1/responses/{id}
    returns it; for Messages, the deferral envelope with the answer as an Anthropic message."""
    req = _request(job)
    adapter = _ADAPTERS[job.wire or ""]
    if job.wire == RESPONSES:
        out = adapter.from_chat(response or {"choices": [{"message": {"content": ""}}]}, req)
        out.update(id=job.id, background=True, created_at=int(job.created), status=_RESPONSE_STATUS[job.status])
        if response is None:
            out.update(output=[], usage=None, completed_at=int(job.completed) if job.completed else None)
        if job.error is not None:
            out["error"] = {"code": job.error.get("code") or "server_error", "message": job.error.get("message", "")}
        return out
    message = adapter.from_chat(response, req) if response is not None else None
    error = ({"type": "api_error", "message": job.error.get("message", "")} if job.error is not None else None)
    return {**{k: v for k, v in envelope.items() if k not in ("object", "response", "error")},
            "type": "message_deferred", "message": message, "error": error}
