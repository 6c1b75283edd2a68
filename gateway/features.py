"""The typed objects that flow one way through the request pipeline.

request -> classify (Findings -> Features) -> decide (Decision) -> redact -> dispatch -> restore -> respond

Every stage takes these small frozen objects and returns new ones; nothing reaches back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SENSITIVITY_LEVELS: tuple[str, ...] = ("none", "low", "medium", "high")
DIFFICULTY_LEVELS: tuple[str, ...] = ("easy", "medium", "hard")

# disabled: a cloud target with no API key (never contacted); offline: configured but unreachable.
Connectivity = Literal["online", "offline", "disabled"]
CONNECTIVITY_STATES: tuple[str, ...] = ("online", "offline", "disabled")


def level_rank(levels: tuple[str, ...], level: str) -> int:
    """Position of `level` in its ordered scale; ValueError for an unknown level."""
    return levels.index(level)


@dataclass(frozen=True)
class Entity:
    """One detected sensitive value. `text` is the raw value: never log it."""

    type: str
    location: str  # JSON-pointer-like path into the request body, e.g. "/messages/2/content"
    start: int
    end: int
    score: float
    level: str
    text: str = field(repr=False)


@dataclass(frozen=True)
class SensitivityFinding:
    level: str = "none"
    entities: tuple[Entity, ...] = ()
    unscanned: tuple[str, ...] = ()  # locations of parts we could not analyse (images, audio)
    evidence: dict[str, Any] = field(default_factory=dict)  # counts by entity type, never values
    error: str | None = None  # set when analysis failed or timed out: callers must fail closed

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entities:
            out[e.type] = out.get(e.type, 0) + 1
        return out


@dataclass(frozen=True)
class DifficultyFinding:
    level: str = "easy"
    score: float = 0.0
    method: str = "none"
    evidence: dict[str, Any] = field(default_factory=dict)


# Spend within this of a budget counts as at it: float sums of prices are not exact.
BUDGET_SLACK_USD = 1e-9


@dataclass(frozen=True)
class BudgetState:
    """The client's spend this period and whether this request's hold (its estimated maximum
    cost, reserved before dispatch) fit beside it, from the state store before the decision (so
    the decision stays a pure function of features and policy). `limit_usd` None: no budget."""

    spent_usd: float = 0.0
    limit_usd: float | None = None
    period: str | None = None
    resets_in_s: float = 0.0  # until the period ends and the spend starts again from 0
    held_usd: float = 0.0  # reserved by requests in flight (this one's included when it fit)
    hold_usd: float = 0.0  # this request's estimated maximum cost
    fits: bool = True  # this request's hold was placed

    @property
    def status(self) -> Literal["ok", "exceeded"]:
        if self.limit_usd is None:
            return "ok"
        return "exceeded" if self.spent_usd >= self.limit_usd - BUDGET_SLACK_USD or not self.fits else "ok"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "spent_usd": round(self.spent_usd, 6), "limit_usd": self.limit_usd,
                "held_usd": round(self.held_usd, 6), "hold_usd": round(self.hold_usd, 6),
                "period": self.period, "resets_in_s": round(self.resets_in_s, 1)}


NO_BUDGET = BudgetState()


@dataclass(frozen=True)
class Features:
    """Everything the policy may look at. Built once per request by the classify stage."""

    model: str
    client: str | None
    connectivity: dict[str, Connectivity]  # per cloud target name
    sensitivity: SensitivityFinding
    difficulty: DifficultyFinding
    prompt_tokens: int
    has_tools: bool
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    has_images: bool = False  # an `image_url` content part in some message
    has_response_format: bool = False  # response_format json_object / json_schema (Responses: text.format)
    budget: BudgetState = NO_BUDGET

    @property
    def structured(self) -> str | None:
        """What asks for a structured answer (tools, a response_format), in words; None: plain chat."""
        parts = [w for w, on in (("tools", self.has_tools), ("a response_format", self.has_response_format)) if on]
        return " and ".join(parts) or None

    @property
    def overall_connectivity(self) -> Connectivity:
        """`online` if any cloud target is online, else `offline` if any is offline, else `disabled`
        (every cloud target lacks a key, or the policy has none: nothing is meant to leave)."""
        states = set(self.connectivity.values())
        return "online" if "online" in states else "offline" if "offline" in states else "disabled"
