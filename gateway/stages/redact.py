"""The redact stage: placeholders in for the cloud, the vault kept (per conversation when the
request names one). It returns what it made; a vault the store cannot keep narrows the decision
to local targets instead (fail closed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from gateway.features import Features
from gateway.policy.evaluate import Decision
from gateway.privacy.native import CODECS
from gateway.privacy.redact import redact_body
from gateway.privacy.vault import Vault
from gateway.runtime import Runtime
from gateway.stages.call import Call
from gateway.stages.decide import vault_unavailable
from gateway.store.base import StoreUnavailable

log = structlog.get_logger("gateway.pipeline")


@dataclass(frozen=True)
class Redaction:
    decision: Decision  # the decision, narrowed to local targets when the vault is unavailable
    vault: Vault | None = None
    redacted: dict[str, Any] | None = None
    native_redacted: dict[str, Any] | None = None  # the pass-through body, redacted in its API's positions


def needed(rt: Runtime, decision: Decision) -> bool:
    """Whether the rule redacts and something in its chain is a cloud target."""
    return decision.action == "route" and decision.redact and any(rt.policy.is_cloud(t) for t in decision.chain)


def conversation_id(call: Call) -> str | None:
    metadata = call.body.get("metadata")
    conversation = call.headers.get("x-hybrid-conversation-id") or (
        metadata.get("conversation_id") if isinstance(metadata, dict) else None)
    return str(conversation) if conversation else None


async def redact(rt: Runtime, call: Call, features: Features, decision: Decision) -> Redaction:
    cid = conversation_id(call)
    try:
        vault = await rt.vaults.load(cid)
        redacted = redact_body(call.body, features.sensitivity, vault, rt.policy.privacy)
        native = (CODECS[call.passthrough.api].redact(call.passthrough.body, vault)  # the same vault's values
                  if call.passthrough is not None else None)
        await rt.vaults.save(cid, vault)
    except StoreUnavailable:
        log.warning("conversation_vault_unavailable", request_id=call.request_id)
        return Redaction(vault_unavailable(rt, decision, "conversation vault unavailable"))
    return Redaction(decision, vault, redacted, native)
