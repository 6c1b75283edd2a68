"""The backend seam: one small protocol that every target implements.

Like httpx's transports: `complete`, `stream`, `aclose`, declared in one base class. Foreign errors (litellm, httpx, the
engine) are translated to `BackendError` at the seam, once, so the pipeline reasons about a
single error tree when it decides whether to retry or fall back.

    BackendError
      kind = "connect"     could not reach the target (refused, DNS, reset before a response)
      kind = "timeout"     no (complete) answer within the deadline
      kind = "status"      the target answered with an HTTP error status (`status`, `retry_after`)
      kind = "protocol"    the answer was not the OpenAI API (HTML captive portal, bad JSON, cut SSE)
      kind = "overloaded"  a local target's queue is full (503 + Retry-After to the client)
      kind = "invalid"     the request itself was rejected (4xx other than 408/409/429): no fallback
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace

ErrorKind = Literal["connect", "timeout", "status", "protocol", "overloaded", "invalid"]


class BackendError(Exception):
    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth another try on the same target (tenacity decides how often)."""
        if self.kind in ("connect", "timeout", "protocol"):
            return True
        if self.kind == "status":
            return self.status is not None and (self.status >= 500 or self.status in (408, 409, 429))
        return False

    @property
    def reason(self) -> str:
        """Short machine-friendly reason for headers and metrics (never request content)."""
        return f"{self.kind}:{self.status}" if self.status else self.kind


@dataclass(frozen=True)
class CallOptions:
    deadline: float  # absolute time.monotonic() by which the call must have finished
    request_id: str = ""
    trace: RequestTrace | None = None  # the request's spans (gateway/tracing.py); None: tracing off
    # Sent as the `Idempotency-Key` header where the target speaks HTTP: a deferred request sent
    # again after a worker died mid-call carries the same key (gateway/deferred/worker.py).
    idempotency_key: str | None = None


class Backend(abc.ABC):
    """A target that answers OpenAI chat-completion bodies; subclass it.

    `body` is the OpenAI request body (already redacted, `model` replaced by the target's model).
    `complete` returns an OpenAI `chat.completion` dict; `stream` yields `chat.completion.chunk`
    dicts (the last one may carry `usage`). Both raise `BackendError` only.

    Everything else a caller may ask of a target is declared here with the answer of a remote
    target (nothing to load, always ready, no statistics), so callers never probe for it: an
    in-process engine overrides `ready`, `load_error`, `load` and `stats`.
    """

    name: str
    # Also answers POST /v1/embeddings through `embed` (the policy says which targets are asked).
    supports_embeddings: ClassVar[bool] = False
    # Why the target cannot answer at all (its model failed to load); None while it can.
    load_error: str | None = None

    @abc.abstractmethod
    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]: ...

    @abc.abstractmethod
    def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]: ...

    async def embed(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        """An OpenAI embeddings request: `input` a list of strings, `model` the target's embedding
        model, `encoding_format` float, maybe `dimensions`. Returns the OpenAI response dict
        (`data[].embedding` float lists, `usage`); raises `BackendError` only."""
        raise BackendError("invalid", f"{self.name} does not embed")

    def prompt_tokens(self, body: dict[str, Any]) -> int | None:
        """The prompt of `body` in this target's own tokens, counted before it answers (what an
        API that reports the input size first, Anthropic's `message_start`, needs); None: this
        target has no tokenizer here, and the caller estimates."""
        return None

    @property
    def ready(self) -> bool:
        """Can answer now (an in-process model has loaded)."""
        return True

    def load(self) -> None:
        """Load what answering needs, blocking (the gateway calls it in a worker thread before it
        serves). Raises `BackendError` when it cannot; then `load_error` says why."""
        return None

    def stats(self) -> dict[str, Any] | None:
        """Counters for /metrics and the dashboard; None: this target keeps none."""
        return None

    async def aclose(self) -> None:
        """Release connections, threads and models; the backend is not called afterwards."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
