"""Difficulty classifier (placeholder: the difficulty issue replaces this module)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from gateway.classify.text import last_user_text
from gateway.features import DifficultyFinding


class DifficultyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = "heuristic"


class LengthDifficultyClassifier:
    def classify(self, body: dict[str, Any]) -> DifficultyFinding:
        n = len(last_user_text(body))
        score = min(1.0, n / 2000)
        level = "hard" if score > 0.66 else "medium" if score > 0.33 else "easy"
        return DifficultyFinding(level=level, score=score, method="length", evidence={"chars": n})


def build_difficulty_classifier(cfg: DifficultyConfig) -> LengthDifficultyClassifier:
    return LengthDifficultyClassifier()
