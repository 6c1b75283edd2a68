"""Per-target reachability: an active probe plus the outcome of real calls, with hysteresis.

Routing reads `state(target)` without waiting: the knowledge is kept warm in the background so a
request never has to discover an outage by timing out. A target flips offline after
`failures_to_offline` consecutive failures and back online after `successes_to_online`
consecutive successes, so a single blip does not flap the route. After a failure the probe runs
sooner, so a dead cloud is marked offline within about one probe interval even with no traffic;
once offline, a target stays so for at least one probe interval (hold-down against flapping).

A cloud target without an API key is `disabled`: never contacted, and reported as such, distinct
from `offline` (configured but unreachable). A target forced `offline` (`serve --offline`, the
admin switch) is not probed either: offline means no traffic to it at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx
import structlog

from gateway.policy.model import ConnectivityConfig
from gateway.policy.targets import CloudTarget

log = structlog.get_logger("gateway.connectivity")

State = Literal["online", "offline", "disabled"]
Force = Literal["online", "offline", "auto"]


@dataclass
class TargetHealth:
    state: Literal["online", "offline"] = "online"  # measured; optimistic at start: the first probe runs at once
    force: Force = "auto"
    failures: int = 0
    successes: int = 0
    last_change: float = field(default_factory=time.time)
    last_error: str | None = None
    probes: int = 0
    disabled: bool = False  # no API key configured: never contacted

    @property
    def effective(self) -> State:
        # Forcing offline is a test of offline mode: it reads offline even without a key.
        if self.force == "offline":
            return "offline"
        if self.disabled:
            return "disabled"
        return self.state if self.force == "auto" else self.force

    @property
    def probed(self) -> bool:
        """Whether the monitor may send this target anything."""
        return not self.disabled and self.force != "offline"


def _probe_url(target: CloudTarget) -> str | None:
    if target.probe_url:
        return target.probe_url
    if target.api_base:
        return target.api_base.rstrip("/") + "/models"
    return None


async def probe_once(client: httpx.AsyncClient, target: CloudTarget, timeout_s: float) -> str | None:
    """None when the target answers like an OpenAI-compatible API; else a short reason.

    A captive portal or proxy typically answers 200 with HTML: only a JSON model list counts.
    """
    url = _probe_url(target)
    if url is None:
        return None  # nothing to probe (provider default endpoint): rely on passive signals
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    if target.api == "messages" and target.api_key:  # Anthropic's own auth, for its GET /v1/models
        headers = {"x-api-key": target.api_key, "anthropic-version": "2023-06-01"}
    try:
        resp = await client.get(url, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        return "probe timeout"
    except httpx.HTTPError as exc:
        return f"probe {type(exc).__name__}"
    if resp.status_code in (401, 403):
        return None  # reachable; the key is the provider's problem, not connectivity
    if resp.status_code != 200:
        return f"probe status {resp.status_code}"
    try:
        payload = resp.json()
    except ValueError:
        return "probe answer is not JSON (captive portal?)"
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        return "probe answer is not a model list"
    return None


class ConnectivityMonitor:
    """Holds the health of every cloud target; safe to call from the event loop only."""

    def __init__(
        self,
        targets: dict[str, CloudTarget],
        cfg: ConnectivityConfig,
        *,
        force_all: Force = "auto",
        on_change: Callable[[str, State], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.targets = dict(targets)
        # A cloud target without a key is switched off rather than probed: with no key we could
        # not use it anyway, and a fresh install must not send a single packet off the device.
        self.health = {
            name: TargetHealth(force=force_all, disabled=not t.api_key, state="offline" if not t.api_key else "online")
            for name, t in targets.items()
        }
        self._on_change = on_change
        self._client = httpx.AsyncClient(transport=transport, trust_env=False)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # -- reading ------------------------------------------------------------------------------
    def state(self, target: str) -> State:
        h = self.health.get(target)
        return h.effective if h else "online"

    def disabled(self, target: str) -> bool:
        h = self.health.get(target)
        return bool(h and h.disabled)

    def forced_offline(self, target: str) -> bool:
        h = self.health.get(target)
        return bool(h and h.force == "offline")

    def snapshot(self) -> dict[str, State]:
        return {name: h.effective for name, h in self.health.items()}

    # -- writing ------------------------------------------------------------------------------
    def force(self, target: str, mode: Force) -> None:
        self.health[target].force = mode
        self._notify(target)
        self._wake.set()

    def record(self, target: str, ok: bool, reason: str | None = None) -> None:
        """Feed the outcome of a real call or a probe into the hysteresis."""
        h = self.health.get(target)
        if h is None:
            return
        before = h.effective
        if ok:
            h.successes += 1
            h.failures = 0
            # Hold-down: stay offline at least one probe interval, so a cloud whose probe answers
            # but whose calls keep failing does not flap on every pair of good probes.
            held = time.time() - h.last_change >= self.cfg.probe_interval_s
            if h.state == "offline" and h.successes >= self.cfg.successes_to_online and held:
                h.state, h.last_change = "online", time.time()
        else:
            h.failures += 1
            h.successes = 0
            h.last_error = reason
            if h.state == "online" and h.failures >= self.cfg.failures_to_offline:
                h.state, h.last_change = "offline", time.time()
        if h.effective != before:
            log.warning("connectivity_changed", target=target, state=h.effective, reason=reason)
            self._notify(target)

    def _notify(self, target: str) -> None:
        if self._on_change:
            self._on_change(target, self.health[target].effective)

    # -- probing ------------------------------------------------------------------------------
    async def probe_all(self) -> None:
        async def one(name: str, target: CloudTarget) -> None:
            reason = await probe_once(self._client, target, self.cfg.probe_timeout_s)
            self.health[name].probes += 1
            if _probe_url(target) is not None:
                self.record(name, reason is None, reason)

        await asyncio.gather(*(one(n, t) for n, t in self.targets.items() if self.health[n].probed))

    def _next_delay(self) -> float:
        # While a target is failing but not yet offline (or offline and recovering), probe more
        # often so the state settles within about one probe interval.
        unsettled = any(
            (h.state == "online" and h.failures) or (h.state == "offline" and h.successes)
            for h in self.health.values()
        )
        base = self.cfg.probe_interval_s
        return base / max(self.cfg.failures_to_offline, self.cfg.successes_to_online, 1) if unsettled else base

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception as exc:  # a probe bug must never kill the monitor
                log.error("probe_failed", error=type(exc).__name__)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can drop a cancel
                async with asyncio.timeout(self._next_delay()):
                    await self._wake.wait()

    def start(self) -> None:
        if any(not h.disabled for h in self.health.values()) and self._task is None:
            self._task = asyncio.create_task(self._run(), name="connectivity-probe")

    async def aclose(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.aclose()

