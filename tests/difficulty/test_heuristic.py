"""The heuristic method: scores, levels from thresholds, determinism, config validation."""

from __future__ import annotations

import pydantic
import pytest

from gateway.classify.difficulty import (
    DifficultyConfig,
    HeuristicDifficultyClassifier,
    build_difficulty_classifier,
)
from gateway.classify.difficulty.heuristic import level_for
from tests.difficulty.conftest import body

HARD_PROMPT = (
    "First, explain step by step why the algorithm below is O(n log n). Then prove it, and finally "
    "implement a faster version. You must keep the same API and answer in at most 200 words.\n"
    "```python\ndef sort(xs):\n    return sorted(xs)\n```\nCompute the cost for n = 10^6 and n = 10^9."
)


def test_harder_requests_score_higher():
    clf = HeuristicDifficultyClassifier(0.35, 0.5)
    easy = clf.classify(body("Say hi."))
    hard = clf.classify(body(HARD_PROMPT, tools=[{"type": "function", "function": {"name": "run"}}]))
    assert 0.0 <= easy.score < hard.score <= 1.0
    assert easy.level == "easy" and hard.level == "hard"
    assert easy.method == hard.method == "heuristic"


def test_deterministic():
    clf = HeuristicDifficultyClassifier(0.35, 0.5)
    assert clf.classify(body(HARD_PROMPT)) == clf.classify(body(HARD_PROMPT))


@pytest.mark.parametrize(("score", "level"), [(0.0, "easy"), (0.299, "easy"), (0.3, "medium"),
                                              (0.69, "medium"), (0.7, "hard"), (1.0, "hard")])
def test_thresholds_to_levels(score, level):
    assert level_for(score, 0.3, 0.7) == level


def test_configured_thresholds_are_used():
    text = body("Explain why the moon has phases, in at most 3 sentences.")
    score = build_difficulty_classifier(DifficultyConfig(method="heuristic")).classify(text).score
    above = DifficultyConfig(method="heuristic", thresholds={"medium": score / 2, "hard": score})
    below = DifficultyConfig(method="heuristic", thresholds={"medium": min(1.0, score + 0.01), "hard": min(1.0, score + 0.02)})
    assert build_difficulty_classifier(above).classify(text).level == "hard"
    assert build_difficulty_classifier(below).classify(text).level == "easy"


def test_evidence_names_features_not_text():
    f = HeuristicDifficultyClassifier(0.35, 0.5).classify(body(HARD_PROMPT))
    assert f.evidence["signals"]["code_blocks"] >= 1
    assert "tokens" in f.evidence["contributions"]
    assert "sorted(xs)" not in repr(f.evidence) and "algorithm below" not in repr(f.evidence)


def test_config_rejects_bad_values():
    with pytest.raises(pydantic.ValidationError):
        DifficultyConfig(method="gpt")
    with pytest.raises(pydantic.ValidationError):
        DifficultyConfig(thresholds={"medium": 0.8, "hard": 0.2})
    with pytest.raises(pydantic.ValidationError):
        DifficultyConfig(unknown_field=1)
    assert DifficultyConfig().method == "knn"
