"""Everything a loaded policy needs at run time: backends, classifiers, connectivity, the state
store with its conversation vaults and rate limits.

A `Runtime` is immutable once built. A policy reload builds a new one, reusing every part whose
configuration did not change (the engine and the NLP models are expensive to load; the vaults
keep their conversations and take a new `vault_ttl_s`), and swaps it in atomically; in-flight
requests finish on the runtime they started with, and `retire` closes what the new one dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from gateway.backends.base import Backend
from gateway.classify.base import DifficultyClassifier, SensitivityClassifier
from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier
from gateway.classify.sensitivity import build_sensitivity_classifier
from gateway.connectivity import ConnectivityMonitor, Force
from gateway.dispatch import Dispatcher
from gateway.policy.model import Policy
from gateway.policy.targets import CloudTarget, LocalTarget
from gateway.privacy.config import PrivacyConfig
from gateway.privacy.vault import VaultStore
from gateway.store.base import StateStore
from gateway.store.budgets import Budgets
from gateway.store.build import build_store
from gateway.store.embedded import EmbeddedStore
from gateway.store.limits import RateLimiter
from gateway.store.vaults import build_vaults


def build_backend(name: str, cfg: CloudTarget | LocalTarget) -> Backend:
    if isinstance(cfg, LocalTarget) and cfg.engine == "local_engine":
        from gateway.backends.engine_backend import EngineBackend

        opts: dict[str, Any] = {}
        if cfg.memory_budget:
            opts["memory_budget"] = cfg.memory_budget
        if cfg.prefix_cache_mb is not None:
            opts["prefix_cache_mb"] = cfg.prefix_cache_mb
        if cfg.speculative is not None:
            opts["speculative"] = cfg.speculative
        if cfg.draft_model is not None:
            opts["draft_model"] = cfg.draft_model
        if cfg.kv_cache is not None:
            opts["kv_cache"] = cfg.kv_cache.model_dump()
        if cfg.standins is not None:
            opts.update(standins=cfg.standins.pack, standin_below=cfg.standins.below)
        return EngineBackend(
            name,
            cfg.model_path or "",
            threads=cfg.threads,
            max_queue=cfg.max_queue,
            max_batch=cfg.max_batch,
            default_max_tokens=cfg.default_max_tokens,
            **opts,
        )
    assert cfg.model is not None
    common: dict[str, Any] = dict(
        model=cfg.model, api_base=cfg.api_base, api_key=cfg.api_key, timeout_s=cfg.timeout_s,
        extra_body=cfg.extra_body,
    )
    if cfg.api != "chat":
        from gateway.backends.wire_http import MessagesHTTPBackend, ResponsesHTTPBackend

        assert cfg.api_base is not None  # the policy checks it
        return (MessagesHTTPBackend if cfg.api == "messages" else ResponsesHTTPBackend)(name, **common)
    direct = cfg.client == "openai" or (
        cfg.client == "auto" and cfg.model.startswith("openai/") and cfg.api_base is not None
    )
    if direct:
        from gateway.backends.openai_http import OpenAIHTTPBackend

        if not cfg.api_base:
            raise ValueError(f"target {name!r}: client openai needs api_base")
        return OpenAIHTTPBackend(name, **common)
    from gateway.backends.litellm_backend import LitellmBackend

    return LitellmBackend(name, **common)


# Classifiers load NLP and embedding models (seconds each) and are safe to share between threads,
# so one instance serves every runtime with the same configuration: reloads and tests stay fast.
# Per kind, only the configurations used last are kept (the current policy's and the one before,
# which in-flight requests may still use): a gateway reloaded through many privacy settings
# would otherwise hold a spaCy pipeline for each.
_KEEP_CLASSIFIERS = 2
_CLASSIFIERS: dict[str, OrderedDict[str, Any]] = {}


_Config = TypeVar("_Config", bound=BaseModel)
_Classifier = TypeVar("_Classifier")


def _shared(kind: str, cfg: _Config, build: Callable[[_Config], _Classifier]) -> _Classifier:
    built: OrderedDict[str, _Classifier] = _CLASSIFIERS.setdefault(kind, OrderedDict())
    key = cfg.model_dump_json()
    if key in built:
        built.move_to_end(key)
    else:
        built[key] = build(cfg)
        while len(built) > _KEEP_CLASSIFIERS:
            built.popitem(last=False)
    return built[key]


def shared_sensitivity(cfg: PrivacyConfig) -> SensitivityClassifier:
    return _shared("sensitivity", cfg, build_sensitivity_classifier)


def shared_difficulty(cfg: DifficultyConfig) -> DifficultyClassifier:
    return _shared("difficulty", cfg, build_difficulty_classifier)


@dataclass(frozen=True)
class Runtime:
    policy: Policy
    backends: dict[str, Backend]
    monitor: ConnectivityMonitor
    dispatcher: Dispatcher
    sensitivity: SensitivityClassifier
    difficulty: DifficultyClassifier
    vaults: VaultStore
    source: str  # the policy file, for messages
    store: StateStore = field(default_factory=EmbeddedStore)  # policy `state:`: shared with other replicas or not
    limits: RateLimiter | None = None  # per-client rate limits; None: no client has one
    budgets: Budgets | None = None  # per-client usage and spend budgets; None: no clients

    def is_engine(self, target: str) -> bool:
        cfg = self.policy.targets[target]
        return isinstance(cfg, LocalTarget) and cfg.engine == "local_engine"

    def engine_model(self, target: str) -> str:
        """The model name an engine target answers with: its model, not the name the client asked
        for (`builtin:smollm2-135m` -> `smollm2-135m`, a directory -> its name)."""
        cfg = self.policy.targets[target]
        path = (cfg.model_path if isinstance(cfg, LocalTarget) else None) or target
        return path.removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1] or target

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the policy is loaded and at least one local target can answer."""
        detail: dict[str, Any] = {}
        any_local = False
        for name, backend in self.backends.items():
            if self.policy.is_cloud(name):
                detail[name] = self.monitor.state(name)
                continue
            ok = backend.ready
            error = backend.load_error
            detail[name] = "ready" if ok else (f"failed: {error}" if error else "loading")
            any_local = any_local or ok
        no_local = not any(not self.policy.is_cloud(n) for n in self.backends)
        return (any_local or no_local), detail


def build_runtime(
    policy: Policy,
    source: str,
    previous: Runtime | None = None,
    *,
    force: Force = "auto",
    on_connectivity_change: Any = None,
) -> Runtime:
    prev_policy = previous.policy if previous else None
    # The state store first: a missing vault key is a startup error before any model loads.
    same_store = previous is not None and prev_policy is not None and prev_policy.state == policy.state
    store = previous.store if previous is not None and same_store else build_store(policy.state)
    vaults = _vaults(policy, store, previous.vaults if previous is not None and same_store else None)
    backends: dict[str, Backend] = {}
    for name, cfg in policy.targets.items():
        if previous and prev_policy and prev_policy.targets.get(name) == cfg and name in previous.backends:
            backends[name] = previous.backends[name]
        else:
            backends[name] = build_backend(name, cfg)

    clouds = {n: t for n, t in policy.targets.items() if isinstance(t, CloudTarget)}
    if (
        previous
        and prev_policy
        and prev_policy.connectivity == policy.connectivity
        and {n: t for n, t in prev_policy.targets.items() if isinstance(t, CloudTarget)} == clouds
    ):
        monitor = previous.monitor
    else:
        monitor = ConnectivityMonitor(clouds, policy.connectivity, force_all=force, on_change=on_connectivity_change)
        if previous:  # keep forced states and what we learnt about targets that still exist
            for name, h in previous.monitor.health.items():
                if name in monitor.health:
                    monitor.health[name] = h

    sensitivity = shared_sensitivity(policy.privacy)
    difficulty = shared_difficulty(policy.difficulty)
    limits = RateLimiter(policy.clients, store)
    budgets = Budgets(policy, store)
    if previous is not None and same_store and previous.budgets is not None:
        budgets.carry_over(previous.budgets)  # nothing owed to the store is lost to a reload
    return Runtime(
        policy=policy,
        backends=backends,
        monitor=monitor,
        dispatcher=Dispatcher(policy, backends, monitor),
        sensitivity=sensitivity,
        difficulty=difficulty,
        vaults=vaults,
        source=source,
        store=store,
        limits=limits if limits else None,
        budgets=budgets if budgets else None,
    )


def _vaults(policy: Policy, store: StateStore, previous: VaultStore | None) -> VaultStore:
    """The conversation vaults: `previous` (on the same state store) keeps its conversations, and
    takes a changed `vault_ttl_s`."""
    ttl_s = policy.privacy.vault_ttl_s
    if previous is None:
        return build_vaults(store, ttl_s)
    return previous if previous.ttl_s == ttl_s else previous.with_ttl(ttl_s)


async def retire(old: Runtime, new: Runtime, grace_s: float) -> None:
    """Close what the new runtime no longer uses, after in-flight requests had time to finish."""
    stale = [b for name, b in old.backends.items() if new.backends.get(name) is not b]
    old_monitor = old.monitor if old.monitor is not new.monitor else None
    if old_monitor:
        await old_monitor.aclose()
    old_store = old.store if old.store is not new.store else None
    if not stale and old_store is None:
        return
    await asyncio.sleep(grace_s)
    for backend in stale:
        with contextlib.suppress(Exception):
            await backend.aclose()
    if old_store is not None:
        await old_store.aclose()

