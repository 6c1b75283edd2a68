"""The `difficulty:` section of a policy file reaches the classifier the gateway builds."""

from __future__ import annotations

import pytest

from gateway.classify.difficulty import HeuristicDifficultyClassifier, build_difficulty_classifier
from gateway.policy.load import PolicyError, load_policy
from tests.difficulty.conftest import policy_with


def test_policy_section_configures_the_classifier(tmp_path):
    policy = load_policy(policy_with(tmp_path, {"method": "heuristic", "thresholds": {"medium": 0.2, "hard": 0.9}}))
    clf = build_difficulty_classifier(policy.difficulty)
    assert isinstance(clf, HeuristicDifficultyClassifier)
    assert (clf.medium, clf.hard) == (0.2, 0.9)


def test_policy_with_bad_difficulty_section_is_rejected(tmp_path):
    with pytest.raises(PolicyError, match="difficulty"):
        load_policy(policy_with(tmp_path, {"method": "knn", "treshold": 0.5}))
