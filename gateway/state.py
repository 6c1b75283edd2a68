"""The process-wide holder of the current Runtime, and the policy file watcher that swaps it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from gateway.backends.base import BackendError
from gateway.backends.litellm_backend import stop_logging_worker
from gateway.connectivity import Force
from gateway.deferred.service import build_deferred
from gateway.logs import AuditLog
from gateway.metrics import Metrics
from gateway.policy.load import PolicyError, load_policy
from gateway.policy.model import Policy
from gateway.runtime import Runtime, build_runtime, retire
from gateway.store.base import StoreUnavailable
from gateway.tracing import Tracing, build_tracing, endpoint_from_env

log = structlog.get_logger("gateway.state")

# Fleet-wide admin switches travel on this channel of the state store (pub/sub on Redis).
CONNECTIVITY_CHANNEL = "fleet:connectivity"
# A policy reload asked of one replica (POST /admin/reload, SIGHUP) is asked of all on this one;
# each re-reads and validates its own policy file, and keeps its last good policy if it fails.
RELOAD_CHANNEL = "fleet:reload"


AuditPrompts = Literal["off", "redacted", "raw"]

@dataclass(frozen=True)
class Settings:
    policy_path: str
    force: Force = "auto"  # `serve --offline` sets "offline" for every cloud target
    admin_key: str | None = field(default_factory=lambda: os.environ.get("GATEWAY_ADMIN_KEY") or None)
    audit_path: str | None = None  # None: no audit log; "-": stdout
    # Prompt text in the audit log: never by default; "redacted" logs the messages with every
    # detected value replaced by a placeholder; "raw" logs them as received (explicit opt-in).
    audit_prompts: AuditPrompts = "off"
    watch: bool = True
    reload_grace_s: float = 30.0
    # OpenTelemetry traces over OTLP/HTTP to this URL (gateway/tracing.py); None: off.
    otlp_endpoint: str | None = field(default_factory=endpoint_from_env)


class GatewayState:
    def __init__(self, settings: Settings, policy: Policy | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.audit = AuditLog(settings.audit_path)
        self.tracing: Tracing | None = build_tracing(settings.otlp_endpoint)
        policy = policy or load_policy(settings.policy_path)
        # Where deferred requests wait is fixed at startup; the worker reads the current runtime.
        self.deferred = build_deferred(policy, lambda: self.runtime)
        self.runtime: Runtime = build_runtime(
            policy, settings.policy_path, force=settings.force, on_connectivity_change=self._on_change
        )
        self.metrics.watch_engines(self._engine_stats)
        self.policy_error: str | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.replica_id = uuid.uuid4().hex  # tells this replica's own broadcasts from others'
        self._reloading = asyncio.Lock()

    def _on_change(self, target: str, state: str) -> None:
        self.metrics.set_connectivity(target, state)
        if state == "online":
            self.deferred.wake()  # requests deferred while it was away go now

    def _engine_stats(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, backend in self.runtime.backends.items():
            stats = backend.stats()
            if stats is not None:
                out[name] = stats
        return out

    async def start(self) -> None:
        for name, state in self.runtime.monitor.snapshot().items():
            self.metrics.set_connectivity(name, state)
        self.runtime.monitor.start()
        self._subscribe(self.runtime)
        self._on_sighup()
        await self._load_engines(self.runtime)
        self.deferred.start()
        if self.settings.watch:
            self._tasks.append(asyncio.create_task(self._watch(), name="policy-watch"))

    def _subscribe(self, rt: Runtime) -> None:
        rt.store.subscribe(CONNECTIVITY_CHANNEL, self._on_fleet_force)
        rt.store.subscribe(RELOAD_CHANNEL, self._on_fleet_reload)

    def _on_sighup(self) -> None:
        # SIGHUP reloads the fleet like POST /admin/reload. Only the main thread may install a
        # handler (tests run several gateways in threads of one process): elsewhere, none.
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError, AttributeError):
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: self._tasks.append(
                asyncio.create_task(self.reload_fleet(), name="sighup-reload")))

    async def reload_fleet(self) -> tuple[bool, bool]:
        """Reload this replica's policy and ask every other replica on the state store to reload
        theirs: (reloaded here, the request reached the store)."""
        ok = await self.reload()
        if not self.runtime.store.shared:
            return ok, False
        try:
            await self.runtime.store.publish(RELOAD_CHANNEL, orjson.dumps({"origin": self.replica_id}))
        except StoreUnavailable:
            return ok, False
        return ok, True

    async def _on_fleet_reload(self, raw: bytes) -> None:
        if orjson.loads(raw).get("origin") == self.replica_id:
            return
        log.info("fleet_policy_reload", file=self.settings.policy_path)
        await self.reload()

    async def broadcast_force(self, target: str | None, force: Force) -> bool:
        """Tell every other replica to force `target` (None: every cloud target); False when the
        store could not carry it (Redis down: this replica alone has switched)."""
        message = orjson.dumps({"origin": self.replica_id, "target": target, "force": force})
        try:
            await self.runtime.store.publish(CONNECTIVITY_CHANNEL, message)
        except StoreUnavailable:
            return False
        return True

    async def _on_fleet_force(self, raw: bytes) -> None:
        msg = orjson.loads(raw)
        if msg.get("origin") == self.replica_id or msg.get("force") not in ("online", "offline", "auto"):
            return
        monitor = self.runtime.monitor
        # Every replica probes on its own; a switch only sets the forced state, as it does locally.
        for name in [msg["target"]] if msg.get("target") else list(monitor.health):
            if name in monitor.health:
                monitor.force(name, msg["force"])
        log.info("fleet_connectivity_forced", target=msg.get("target") or "*", force=msg["force"])

    async def _load_engines(self, rt: Runtime) -> None:
        """Load in-process models before serving. A model that cannot load is logged and reported
        by /readyz; the gateway still serves whatever its other targets can."""
        for name, backend in rt.backends.items():
            if not backend.ready:
                try:
                    await asyncio.to_thread(backend.load)
                except Exception as exc:
                    log.error("engine_load_failed", target=name, error=exc.message if isinstance(exc, BackendError) else str(exc))

    async def reload(self) -> bool:
        """Load the policy file again; on any error keep the last good policy."""
        async with self._reloading:  # the watcher, the fleet and the admin may ask at once
            return await self._reload()

    async def _reload(self) -> bool:
        path = self.settings.policy_path
        try:
            policy = await asyncio.to_thread(load_policy, path)
            old = self.runtime
            new = await asyncio.to_thread(
                build_runtime, policy, path, old, force=self.settings.force, on_connectivity_change=self._on_change
            )
            await self._load_engines(new)
        except PolicyError as exc:
            self.policy_error = str(exc)
            self.metrics.policy_reloads.labels("invalid").inc()
            log.error("policy_reload_rejected", file=path, problems=[str(p) for p in exc.problems])
            return False
        except Exception as exc:
            self.policy_error = f"{type(exc).__name__}: {exc}"
            self.metrics.policy_reloads.labels("failed").inc()
            log.error("policy_reload_failed", file=path, error=self.policy_error)
            return False
        self.runtime = new
        self.policy_error = None
        if new.monitor is not old.monitor:
            new.monitor.start()
        if new.store is not old.store:
            self._subscribe(new)
        self.metrics.policy_reloads.labels("ok").inc()
        log.info("policy_reloaded", file=path, rules=len(policy.rules))
        self._tasks = [t for t in self._tasks if not t.done()]  # earlier reloads' retired runtimes
        self._tasks.append(asyncio.create_task(retire(old, new, self.settings.reload_grace_s)))
        return True

    async def _watch(self) -> None:
        from watchfiles import awatch

        target = Path(self.settings.policy_path).resolve()
        # Watch the directory: editors replace files (rename), which a file watch would miss.
        async for changes in awatch(target.parent, debounce=200, step=50, recursive=False):
            if any(Path(p).resolve() == target for _, p in changes):
                await self.reload()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.deferred.aclose()
        await self.runtime.monitor.aclose()
        if self.runtime.budgets is not None:
            await self.runtime.budgets.drain()  # usage still on its way to the store
        await self.runtime.store.aclose()
        for backend in self.runtime.backends.values():
            with contextlib.suppress(Exception):
                await backend.aclose()
        with contextlib.suppress(Exception):
            await stop_logging_worker()
        self.audit.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # sends the spans still batched
