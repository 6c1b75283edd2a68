"""Shared fixtures: the knn classifier (embedding model) is built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROUTING_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "routing"


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
    assert path.is_file(), f"shared routing data missing: {path}"
    return path


def body(text: str, **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}
