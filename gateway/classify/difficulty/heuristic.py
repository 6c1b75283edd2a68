"""The `heuristic` method: a fixed logistic score over the model-free signals. No model, no data.

The weights are set by hand. On the shared routing data (MMLU + GSM8K) a logistic fit puts the
weight on length in word pieces and on numbers / multi-step cues; the data has no code, tools,
long conversations or non-English text, so those weights encode the usual prior that such requests
are harder for a small local model. Deliberately small: this is the fallback, and the `knn` method
re-learns the weight of every signal from data.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.classify.difficulty.cues import detect, reasons
from gateway.classify.difficulty.signals import SIGNAL_NAMES, Signals, read, vector
from gateway.features import DifficultyFinding

# Weight per signal (on the log1p scale of `signals.vector`, non_english as a 0..1 share).
WEIGHTS: dict[str, float] = {
    "chars": 0.0,  # collinear with tokens; tokens carries the length
    "tokens": 0.45,
    "code_blocks": 0.5,
    "math": 0.15,
    "numbers": 0.2,
    "reasoning_cues": 0.25,
    "step_cues": 0.2,
    "constraints": 0.1,
    "questions": 0.0,
    "turns": 0.35,
    "tools": 0.3,
    "non_english": 1.0,
}
# A 60-word plain question scores about 0.3: most everyday prompts stay with the local model.
INTERCEPT = -2.75
# Used when no calibration is available (no artefact); the artefact carries calibrated ones.
DEFAULT_THRESHOLDS = (0.35, 0.5)

assert set(WEIGHTS) == set(SIGNAL_NAMES), "a signal without a heuristic weight"


def heuristic_logit(s: Signals) -> tuple[float, dict[str, float]]:
    """Logit and each signal's contribution to it (the evidence)."""
    contrib = {
        name: round(WEIGHTS[name] * v, 4)
        for name, v in zip(SIGNAL_NAMES, vector(s), strict=True)
        if WEIGHTS[name] and v
    }
    return INTERCEPT + sum(contrib.values()), contrib


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60 else 0.0


def level_for(score: float, medium: float, hard: float) -> str:
    return "hard" if score >= hard else "medium" if score >= medium else "easy"


class HeuristicDifficultyClassifier:
    """Stateless and thread-safe."""

    method = "heuristic"
    runs_inline = True  # ~0.2 ms of regexes: cheaper than a thread hand-off

    def __init__(self, medium: float, hard: float, note: str | None = None) -> None:
        self.medium, self.hard = medium, hard
        self.note = note  # why we are running the heuristic (e.g. a fallback), shown in evidence

    def score(self, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        r = read(body)
        s = r.signals
        logit, contrib = heuristic_logit(s)
        cues = detect(r.text, turns=s.turns)  # everyday cues, as for knn (cues.py)
        evidence: dict[str, Any] = {
            "reasons": reasons(cues) or ["no everyday cue: length and wording alone"],
            "cues": {c.name: c.weight for c in cues},
            "fitted_score": round(sigmoid(logit), 6),
            "signals": {k: v for k, v in s.as_dict().items() if v},
            "contributions": contrib,
        }
        if self.note:
            evidence["fallback"] = self.note
        return sigmoid(logit + sum(c.weight for c in cues)), evidence

    def classify(self, body: dict[str, Any]) -> DifficultyFinding:
        score, evidence = self.score(body)
        evidence["thresholds"] = {"medium": self.medium, "hard": self.hard}
        return DifficultyFinding(
            level=level_for(score, self.medium, self.hard), score=round(score, 6), method=self.method,
            evidence=evidence,
        )
