"""The policy as typed data: what a YAML policy file may say, validated by pydantic.

This module and `gateway.policy.targets` (the targets a rule routes to) are the single source of
truth for the policy format: `policies/schema.json` is generated from `Policy.model_json_schema()`
(a test keeps them in sync).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.classify.difficulty import DifficultyConfig
from gateway.features import DIFFICULTY_LEVELS, SENSITIVITY_LEVELS
from gateway.policy.targets import (
    BUILTIN_EMBEDDINGS,
    CloudTarget,
    Embeddings,
    LocalTarget,
    Prices,
    Strict,
    Target,
)
from gateway.privacy.config import PrivacyConfig

ConnectivityState = Literal["online", "offline", "disabled"]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=64)]


class ConnectivityConfig(Strict):
    probe_interval_s: float = Field(10.0, gt=0)
    probe_timeout_s: float = Field(2.0, gt=0)
    failures_to_offline: int = Field(3, ge=1)
    successes_to_online: int = Field(2, ge=1)


BudgetPeriod = Literal["hour", "day", "week", "month"]


class Budget(Strict):
    usd: float = Field(gt=0, description="The most this client may spend per period, in USD.")
    period: BudgetPeriod = Field("day", description="hour, day, week (from Monday) or month, in UTC.")
    hold_tokens: int = Field(
        1024, ge=0, description="Completion tokens held against the budget (at the priced targets' output price) "
        "for a request that sets no max_tokens, until its actual cost settles it.")


class Client(Strict):
    name: Name
    api_key: str = Field(min_length=1)
    requests_per_min: int | None = Field(
        None, ge=1, description="Requests a minute this client may send (token bucket; fleet-wide on redis state)."
    )
    tokens_per_min: int | None = Field(
        None, ge=1, description="Prompt tokens (estimated) plus max_tokens a minute this client may send."
    )
    budget: Budget | None = Field(
        None, description="Spend cap over a calendar period (UTC), e.g. {usd: 5, period: day}, charged at the "
        "targets' `prices`. Over it, a request whose chain has a priced target gets 429 budget_exceeded until "
        "the period ends, unless a rule with `when: {budget: exceeded}` sends it elsewhere first.")


class StateConfig(Strict):
    backend: Literal["embedded", "redis"] = Field(
        "embedded", description="embedded: this process's memory (one replica); redis: shared by every replica. "
        "Unset: redis when `url` is set, else embedded."
    )
    url: str | None = Field(None, description="redis://host:port/db, for backend redis.")
    timeout_ms: float = Field(500.0, gt=0, description="Socket timeout of each store call; over it, degrade.")

    @model_validator(mode="before")
    @classmethod
    def _backend_from_url(cls, data: Any) -> Any:
        # `url: ${STATE_URL:-}` alone switches a shipped policy to Redis from the environment.
        if isinstance(data, dict) and "backend" not in data and data.get("url"):
            return {**data, "backend": "redis"}
        return data

    @model_validator(mode="after")
    def _url_for_redis(self) -> StateConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError("state.backend redis needs state.url (redis://host:port/db)")
        return self


class Limits(Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_messages: int = Field(2048, ge=1)
    request_timeout_s: float = Field(120.0, gt=0, description="Deadline for a whole request.")
    body_read_timeout_s: float = Field(10.0, gt=0, description="Slow clients are cut off after this.")
    classify_budget_ms: float = Field(
        1500.0, gt=0, description="Time budget for all classifiers; over it, fail closed."
    )


def _check_level(levels: tuple[str, ...], v: Any) -> Any:
    level = v.get("at_least") if isinstance(v, dict) else v
    if level not in levels:
        raise ValueError(f"unknown level {level!r}; expected one of {', '.join(levels)}")
    return v


class AtLeast(Strict):
    at_least: str


class Bound(Strict):
    gt: int | None = None
    lt: int | None = None

    @model_validator(mode="after")
    def _some(self) -> Bound:
        if self.gt is None and self.lt is None:
            raise ValueError("give `gt` and/or `lt`")
        return self


class When(Strict):
    """All keys are ANDed. An empty `when` (or none) matches every request."""

    connectivity: ConnectivityState | list[ConnectivityState] | None = Field(
        None,
        description="online: a cloud target is reachable; offline: none is, and one is configured but "
        "unreachable (or forced offline); disabled: no cloud target has an API key. A list matches any of them.",
    )
    sensitivity: str | AtLeast | None = None
    difficulty: str | AtLeast | None = None
    model: str | None = Field(None, description="Glob on the requested model name.")
    client: str | None = Field(None, description="Glob on the authenticated client name.")
    prompt_tokens: Bound | None = None
    has_tools: bool | None = None
    has_images: bool | None = Field(None, description="Some message has an image_url content part.")
    header: dict[str, str] | None = Field(None, description="Header name -> glob on its value.")
    budget: Literal["ok", "exceeded"] | None = Field(
        None, description="exceeded: the client has spent its `budget` for the period (a client without one is "
        "always ok). Place a rule on it before the others to send over-budget traffic to a free target.")

    @field_validator("sensitivity", mode="before")
    @classmethod
    def _sens(cls, v: Any) -> Any:
        return v if v is None else _check_level(SENSITIVITY_LEVELS, v)

    @field_validator("difficulty", mode="before")
    @classmethod
    def _diff(cls, v: Any) -> Any:
        return v if v is None else _check_level(DIFFICULTY_LEVELS, v)

    @property
    def is_catch_all(self) -> bool:
        return all(value is None for _, value in self)


class Block(Strict):
    status: int = Field(403, ge=400, le=599)
    message: str = "Blocked by policy."


# What a request with tools or a response_format (json_object / json_schema) gets on a local target.
LocalTools = Literal["honour", "refuse"]
_LOCAL_TOOLS_DOC = (
    "A request with tools or a response_format (json_object / json_schema) on local targets. honour: they "
    "answer it (the in-process engine under a grammar: calls and JSON well-formed by construction; a local "
    "server gets the request as sent). refuse: local targets are taken out of the chain for it; with no cloud "
    "target of the chain online, or a request naming a local target, it is refused (403 "
    "local_tools_refused, naming the rule).")


class Rule(Strict):
    name: Name
    description: str | None = None
    when: When = Field(default_factory=When)
    route: str | None = None
    redact: bool = False
    fallback: list[str] | None = Field(
        None, description="Ordered targets tried when the route fails. Absent: defaults.fallback."
    )
    first_token_timeout_s: float | None = Field(
        None, gt=0, description="Overrides the targets' first_token_timeout_s for this rule's chain."
    )
    stall_timeout_s: float | None = Field(None, gt=0, description="Overrides the targets' stall_timeout_s.")
    min_tokens_per_s: float | None = Field(None, gt=0, description="Overrides the targets' min_tokens_per_s.")
    min_rate_window_s: float | None = Field(None, gt=0, description="Overrides the targets' min_rate_window_s.")
    hedge_after_s: float | None = Field(
        None, gt=0, description="No first token from the route after this: start the next target of the chain "
        "in parallel; the first to answer wins, the other is cancelled.",
    )
    block: Block | None = None
    allow_space_change: bool = Field(
        False, description="Embeddings: may this rule's chain answer in another vector space than the one "
        "asked for (e.g. offline, the device's MiniLM for a cloud model)? Default: no, the request is refused.",
    )
    defer_when_offline: bool = Field(
        False, description="A non-streamed request this rule sends only to cloud targets, arriving while none "
        "is reachable, is accepted with 202 and sent when one is back (GET /v1/deferred/{id}); the header "
        "`x-hybrid-defer: true` asks the same for one request.",
    )
    allow_pin: bool | None = Field(
        None,
        description="May a request that names a cloud target (model: <target>) go there anyway? "
        "Default: yes, except for rules that test sensitivity or connectivity (the guards).",
    )
    local_tools: LocalTools | None = Field(None, description=_LOCAL_TOOLS_DOC + " Absent: defaults.local_tools.")

    @property
    def pin_allowed(self) -> bool:
        if self.allow_pin is not None:
            return self.allow_pin
        return self.when.sensitivity is None and self.when.connectivity is None

    @model_validator(mode="after")
    def _one_action(self) -> Rule:
        if (self.route is None) == (self.block is None):
            raise ValueError("a rule needs exactly one of `route` or `block`")
        return self


class Defaults(Strict):
    fallback: list[str] = Field(default_factory=list)
    local_tools: LocalTools = Field("honour", description=_LOCAL_TOOLS_DOC)
    images: Literal["drop", "reject"] = Field(
        "drop",
        description="A request with images whose chain has no target that takes them (`vision`): drop the "
        "image parts and say so in x-hybrid-warning, or reject it with a 400.",
    )


class DeferredConfig(Strict):
    """Where deferred requests wait (docs/operations.md, Deferred requests)."""

    dir: str | None = Field(
        None, description="Directory of the embedded queue's file (deferred.sqlite3; created on the first deferral). "
        "Absent: $GATEWAY_STATE_DIR, else $XDG_STATE_HOME/hybrid-gateway, else ~/.local/state/hybrid-gateway. "
        "With state.backend redis the queue is on Redis instead.")
    callback_hosts: list[str] = Field(
        default_factory=list, description="Hosts a request's x-hybrid-callback-url may name, besides loopback.")
    retention_s: float = Field(86400.0, gt=0, description="How long a request waits to be sent, and its answer "
                               "is kept after, before both are dropped.")
    poll_s: float = Field(2.0, gt=0, description="How often a replica looks for due requests (also at once when "
                          "a cloud target comes back online).")
    max_attempts: int = Field(5, ge=1, description="Calls that reach a target and fail before the request is "
                              "marked failed (waiting for connectivity does not count).")


class Policy(Strict):
    version: Literal[1]
    targets: dict[Name, Target]
    aliases: dict[str, str] = Field(
        default_factory=dict, description="Model name -> target name, or `auto` for the policy's choice."
    )
    connectivity: ConnectivityConfig = Field(default_factory=ConnectivityConfig)
    clients: list[Client] | None = Field(None, description="Absent: no authentication.")
    limits: Limits = Field(default_factory=Limits)
    state: StateConfig = Field(default_factory=StateConfig)
    defaults: Defaults = Field(default_factory=Defaults)
    deferred: DeferredConfig = Field(default_factory=DeferredConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    difficulty: DifficultyConfig = Field(default_factory=DifficultyConfig)
    rules: list[Rule] = Field(min_length=1)

    def chain(self, rule: Rule) -> tuple[str, ...]:
        """The route followed by its fallbacks, without repeats."""
        names = [rule.route, *(rule.fallback if rule.fallback is not None else self.defaults.fallback)]
        out: list[str] = []
        for n in names:
            if n and n not in out:
                out.append(n)
        return tuple(out)

    @property
    def reads_difficulty(self) -> bool:
        """Whether any rule looks at difficulty: if none does, requests are not scored."""
        return any(r.when.difficulty is not None for r in self.rules)

    def is_cloud(self, target: str) -> bool:
        return isinstance(self.targets[target], CloudTarget)

    def local_tools(self, rule: Rule) -> LocalTools:
        return rule.local_tools or self.defaults.local_tools

    def takes_images(self, target: str) -> bool:
        cfg = self.targets[target]
        if cfg.vision is not None:
            return cfg.vision
        return not (isinstance(cfg, LocalTarget) and cfg.engine == "local_engine")

    def embeddings_of(self, target: str) -> Embeddings | None:
        """What the target embeds with, or None when it does not embed."""
        cfg = self.targets[target]
        if cfg.embeddings is not None:
            return cfg.embeddings
        return BUILTIN_EMBEDDINGS if isinstance(cfg, LocalTarget) and cfg.engine == "local_engine" else None

    def prices(self, target: str) -> Prices | None:
        """What `target` charges a client's budget; None: nothing (local targets, unpriced ones)."""
        cfg = self.targets[target]
        prices = cfg.prices if isinstance(cfg, CloudTarget) else None
        return prices if prices is not None and not prices.free else None

    @property
    def cloud_targets(self) -> list[str]:
        return [n for n, t in self.targets.items() if isinstance(t, CloudTarget)]


def cross_check(policy: Policy) -> list[tuple[str, str]]:
    """Checks across sections that field validation cannot see: (dotted location, message)."""
    errors: list[tuple[str, str]] = []
    for i, rule in enumerate(policy.rules):
        if rule.route and rule.route not in policy.targets:
            errors.append((f"rules.{i}.route", f"unknown target {rule.route!r}"))
        for j, name in enumerate(rule.fallback or []):
            if name not in policy.targets:
                errors.append((f"rules.{i}.fallback.{j}", f"unknown target {name!r}"))
    for j, name in enumerate(policy.defaults.fallback):
        if name not in policy.targets:
            errors.append((f"defaults.fallback.{j}", f"unknown target {name!r}"))
    for alias, name in policy.aliases.items():
        if name != "auto" and name not in policy.targets:
            errors.append((f"aliases.{alias}", f"alias points to unknown target {name!r}"))
        if alias in policy.targets:
            errors.append((f"aliases.{alias}", f"alias {alias!r} shadows a target of the same name"))
    seen: set[str] = set()
    for i, rule in enumerate(policy.rules):
        if rule.name in seen:
            errors.append((f"rules.{i}.name", f"duplicate rule name {rule.name!r}"))
        seen.add(rule.name)
    for i, rule in enumerate(policy.rules[:-1]):
        if rule.when.is_catch_all:
            later = policy.rules[i + 1].name
            errors.append(
                (f"rules.{i + 1}", f"rule {later!r} is unreachable: rule {rule.name!r} before it matches everything")
            )
            break
    return errors
