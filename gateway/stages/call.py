"""The objects one request carries through the stages: the call as it came in, what the prepare
stages made of it, and what served it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.dispatch import Fallback, Part
from gateway.features import Features
from gateway.hedge import Hedge
from gateway.policy.evaluate import Decision
from gateway.privacy.vault import Vault
from gateway.store.base import Hold
from gateway.tracing import RequestTrace
from gateway.wire.passthrough import Passthrough


@dataclass(frozen=True)
class Call:
    body: dict[str, Any]
    headers: dict[str, str]  # lower-cased names
    client: str | None
    request_id: str
    started: float = field(default_factory=time.monotonic)
    trace: RequestTrace | None = None  # None: tracing off (the default), and every stage skips it
    # The client's own body, for a target of its API (gateway/wire/passthrough.py); every stage
    # reads `body`, only a same-API backend this.
    passthrough: Passthrough | None = None


@dataclass
class Prepared:
    """A classified, decided and (where the rule says) redacted request, ready to dispatch."""

    call: Call
    features: Features
    decision: Decision
    vault: Vault | None = None
    redacted: dict[str, Any] | None = None
    native_redacted: dict[str, Any] | None = None  # the pass-through body, redacted in its API's positions
    hold: Hold | None = None  # the budget hold placed before dispatch: settled by charge(), or released


@dataclass
class Served:
    """What the respond stage needs to build headers, metrics and the audit line."""

    target: str
    fallbacks: list[Fallback]
    redactions: int
    hedge: Hedge | None = None
    parts: list[Part] = field(default_factory=list)  # who wrote the answer: several for a resumed stream
    warnings: list[str] = field(default_factory=list)  # what the dispatch changed (x-hybrid-warning)

    @property
    def model(self) -> str | None:
        """The model that produced the answer (its first part, for a resumed stream)."""
        return self.parts[0].model if self.parts else None


_UNTRACED = contextlib.nullcontext()


def stage(call: Call, name: str) -> contextlib.AbstractContextManager[Any]:
    """The stage's span, or a shared do-nothing context when tracing is off."""
    return call.trace.stage(name) if call.trace is not None else _UNTRACED
