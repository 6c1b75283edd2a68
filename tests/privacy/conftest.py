"""Analyzers are slow to build (spaCy): one per configuration for the whole session."""

from __future__ import annotations

import pytest

from gateway.classify.sensitivity import PresidioSensitivityClassifier, build_sensitivity_classifier
from gateway.privacy.config import PrivacyConfig

CUSTOM = {
    "nlp_model": "none",  # blank pipeline: pattern recognizers only (also proves `none` works)
    "recognizers": [
        {"entity": "PROJECT_CODE", "level": "high", "deny_list": ["Bluebird", "Nightjar"]},
        {
            "entity": "CUSTOMER_ID",
            "level": "medium",
            "patterns": [{"regex": r"\bCUST-\d{6}\b", "score": 0.3}],
            "context": ["customer", "account"],
        },
    ],
    "allow": {"EMAIL_ADDRESS": ["support@example.com"]},
    "score_thresholds": {"PHONE_NUMBER": 0.6},
    "unscanned_level": "low",
}


@pytest.fixture(scope="session")
def default_cfg() -> PrivacyConfig:
    return PrivacyConfig()


@pytest.fixture(scope="session")
def classifier(default_cfg: PrivacyConfig) -> PresidioSensitivityClassifier:
    c = build_sensitivity_classifier(default_cfg)
    assert isinstance(c, PresidioSensitivityClassifier)
    return c


@pytest.fixture(scope="session")
def custom_cfg() -> PrivacyConfig:
    return PrivacyConfig.model_validate(CUSTOM)


@pytest.fixture(scope="session")
def custom_classifier(custom_cfg: PrivacyConfig) -> PresidioSensitivityClassifier:
    c = build_sensitivity_classifier(custom_cfg)
    assert isinstance(c, PresidioSensitivityClassifier)
    return c

