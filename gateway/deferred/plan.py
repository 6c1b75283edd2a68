"""Which requests are deferred, and where their answer may be delivered: pure functions of the
request, its decision and the policy."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

from gateway.policy.evaluate import Decision
from gateway.policy.model import Policy
from gateway.schema import APIError

DEFER_HEADER = "x-hybrid-defer"
CALLBACK_HEADER = "x-hybrid-callback-url"
IDEMPOTENCY_HEADER = "idempotency-key"
_TRUE = frozenset({"1", "true", "yes", "on"})


def asked(headers: Mapping[str, str]) -> bool:
    return headers.get(DEFER_HEADER, "").strip().lower() in _TRUE


def check_stream(headers: Mapping[str, str], streamed: bool) -> None:
    """Asking to defer a stream is a client error, whatever the connectivity: a deferred answer
    is one JSON object."""
    if streamed and asked(headers):
        raise APIError(400, f"`{DEFER_HEADER}: true` needs a non-streamed request (stream: false): a deferred "
                       "answer is fetched as one JSON object.", param="stream", code="defer_needs_no_stream")


def deferrable(policy: Policy, decision: Decision, headers: Mapping[str, str]) -> bool:
    """A routed request marked deferrable (header, or its rule's `defer_when_offline`) that only
    cloud targets may answer."""
    if decision.action != "route" or not decision.chain:
        return False
    if not asked(headers):
        rule = next((r for r in policy.rules if r.name == decision.rule), None)
        if rule is None or not rule.defer_when_offline:
            return False
    return all(policy.is_cloud(t) for t in decision.chain)


def unreachable(chain: tuple[str, ...], connectivity: Mapping[str, str]) -> bool:
    """No target of the chain is reachable now, and one could come back (a target without an API
    key is `disabled` for good: deferring for it would wait forever)."""
    states = [connectivity.get(t, "online") for t in chain]
    return "online" not in states and "offline" in states


def callback_url(value: str, allowed_hosts: list[str]) -> str:
    """The callback URL, if it names loopback or a host the policy allows; else a 400."""
    parts = urlsplit(value.strip())
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or len(value) > 2048:
        raise APIError(400, f"`{CALLBACK_HEADER}` must be an http(s) URL.", param=CALLBACK_HEADER,
                       code="invalid_callback_url")
    if host == "localhost" or host in {h.lower() for h in allowed_hosts}:
        return value.strip()
    try:
        if ipaddress.ip_address(host).is_loopback:
            return value.strip()
    except ValueError:
        pass
    raise APIError(400, f"`{CALLBACK_HEADER}` may only name loopback or a host in the policy's "
                   "deferred.callback_hosts.", param=CALLBACK_HEADER, code="callback_not_allowed")
