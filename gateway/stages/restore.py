"""The restore stage: placeholders out of what a cloud target wrote under a redacting rule, for
a whole answer here and chunk by chunk for a stream (the restorer a stream feeds)."""

from __future__ import annotations

from typing import Any

from gateway.privacy.native import CODECS, PassthroughStreamRestorer
from gateway.privacy.restore import StreamRestorer
from gateway.runtime import Runtime
from gateway.stages.call import Prepared, stage
from gateway.stages.targets import passthrough_api
from gateway.wire.passthrough import NATIVE, answer_from_events

StreamRestorers = StreamRestorer | PassthroughStreamRestorer


def restoring(rt: Runtime, prepared: Prepared, target: str) -> bool:
    return prepared.vault is not None and prepared.redacted is not None and rt.policy.is_cloud(target)


def stream_restorer(rt: Runtime, prepared: Prepared, target: str, native: bool = True) -> StreamRestorers | None:
    if not restoring(rt, prepared, target):
        return None
    assert prepared.vault is not None
    api = passthrough_api(rt, prepared, target) if native else None
    if api is not None:
        return PassthroughStreamRestorer(prepared.vault.stream_restorer(), CODECS[api].event_restorer(prepared.vault))
    return prepared.vault.stream_restorer()


def completion(rt: Runtime, prepared: Prepared, target: str, response: dict[str, Any]) -> dict[str, Any]:
    """A whole answer as the client gets it: a pass-through read as a stream becomes its API's
    answer, and what a redacted request's target wrote is restored."""
    if isinstance(events := response.get(NATIVE), list):  # read as a stream (slowness limits): its events
        api = passthrough_api(rt, prepared, target)
        answer = answer_from_events(api, events) if api is not None else None
        response = {k: v for k, v in response.items() if k != NATIVE} | ({NATIVE: answer} if answer else {})
    if not restoring(rt, prepared, target):
        return response
    assert prepared.vault is not None
    with stage(prepared.call, "restore"):
        response = prepared.vault.restore_completion(response)
        api = passthrough_api(rt, prepared, target)
        if api is not None and isinstance(response.get(NATIVE), dict):
            response[NATIVE] = CODECS[api].restore(response[NATIVE], prepared.vault)
    return response
