"""Sensitivity classifier (placeholder: the privacy issue replaces this module)."""

from __future__ import annotations

from typing import Any

from gateway.features import SensitivityFinding
from gateway.privacy.config import PrivacyConfig


class NullSensitivityClassifier:
    def classify(self, body: dict[str, Any]) -> SensitivityFinding:
        return SensitivityFinding(level="none")


def build_sensitivity_classifier(cfg: PrivacyConfig) -> NullSensitivityClassifier:
    return NullSensitivityClassifier()
