"""Shared fixtures: the knn classifier (embedding model) is built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.routing_data import ROUTING_DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")




@pytest.fixture(scope="session")
def knn_classifier():
    from gateway.classify.difficulty import (
        DifficultyConfig,
        KnnDifficultyClassifier,
        build_difficulty_classifier,
    )

    clf = build_difficulty_classifier(DifficultyConfig())
    assert isinstance(clf, KnnDifficultyClassifier), "the default config must build the knn method here"
    return clf


@pytest.fixture(scope="session")
def labelled_path() -> Path:
    path = ROUTING_DATA / "labelled_prompts.jsonl"
    assert path.is_file(), f"routing data missing from the repository: {path}"
    return path


def body(text: str, **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


def policy_with(tmp_path: Path, section: dict) -> Path:
    """The default policy with its `difficulty:` section replaced, written to a file."""
    doc = yaml.safe_load(DEFAULT_POLICY.read_text())
    doc["difficulty"] = section
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
