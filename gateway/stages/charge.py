"""Usage against the client's budget: the hold placed at admission settled once, by the answer's
charge or released when there is no answer to charge."""

from __future__ import annotations

from typing import Any

import structlog

from gateway.runtime import Runtime
from gateway.stages.call import Call, Prepared, Served
from gateway.store.base import Hold
from gateway.store.budgets import Charge

log = structlog.get_logger("gateway.pipeline")


def release(rt: Runtime, call: Call, hold: Hold | None) -> None:
    """A held request that ends without an answer to charge: its budget hold is released."""
    if hold is not None and rt.budgets is not None:
        rt.budgets.release(hold, call.client)


def release_prepared(rt: Runtime, prepared: Prepared) -> None:
    release(rt, prepared.call, prepared.hold)
    prepared.hold = None


def answer_chars(response: dict[str, Any]) -> int:
    return sum(len(c["message"].get("content") or "") for c in response.get("choices") or ()
               if isinstance(c, dict) and isinstance(c.get("message"), dict))


async def charge(rt: Runtime, prepared: Prepared, served: Served, chars: list[int]) -> None:
    """Count the answer against the client's usage and budget: each part's reported usage, or the
    ~4 characters a token estimate (`chars`: the text each part wrote) where it sent none."""
    if rt.budgets is None or prepared.call.client is None:
        return
    charges = []
    for part, n in zip(served.parts, chars, strict=False):
        used = part.usage or {}
        prompt, completion = used.get("prompt_tokens"), used.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            charges.append(Charge(part.target, prompt, completion))
        else:
            charges.append(Charge(part.target, prepared.features.prompt_tokens, (n + 3) // 4, estimated=True))
    hold, prepared.hold = prepared.hold, None  # settled once
    try:
        rt.budgets.charge(prepared.call.client, hold, charges)
    except Exception as exc:  # counting must never fail an answer already given
        log.error("usage_charge_failed", error=type(exc).__name__, request_id=prepared.call.request_id)
