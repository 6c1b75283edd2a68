"""The `difficulty:` section of a policy file reaches the classifier the gateway builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.classify.difficulty import HeuristicDifficultyClassifier, build_difficulty_classifier
from gateway.policy.load import PolicyError, load_policy

DEFAULT = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


def _policy_with(tmp_path: Path, section: dict) -> Path:
    doc = yaml.safe_load(DEFAULT.read_text())
    doc["difficulty"] = section
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_policy_section_configures_the_classifier(tmp_path):
    policy = load_policy(_policy_with(tmp_path, {"method": "heuristic", "thresholds": {"medium": 0.2, "hard": 0.9}}))
    clf = build_difficulty_classifier(policy.difficulty)
    assert isinstance(clf, HeuristicDifficultyClassifier)
    assert (clf.medium, clf.hard) == (0.2, 0.9)


def test_policy_with_bad_difficulty_section_is_rejected(tmp_path):
    with pytest.raises(PolicyError, match="difficulty"):
        load_policy(_policy_with(tmp_path, {"method": "knn", "treshold": 0.5}))
