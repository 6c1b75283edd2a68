"""The shipped artefact: small, hashed, fast to load; a damaged or missing one is refused or skipped."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from structlog.testing import capture_logs

from gateway.classify.difficulty import (
    DifficultyConfig,
    HeuristicDifficultyClassifier,
    build_difficulty_classifier,
)
from gateway.classify.difficulty.artefact import SHIPPED, SHIPPED_MINILM, ArtefactError, load_artefact
from gateway.classify.difficulty.data import sha256_file
from tests.difficulty.conftest import body


def test_shipped_artefact_is_small_hashed_and_loads_fast():
    meta = json.loads(SHIPPED.read_text())
    npz = SHIPPED.parent / meta["arrays"]
    assert npz.stat().st_size < 1_000_000
    assert sha256_file(npz) == meta["sha256"]
    t0 = time.perf_counter()
    art = load_artefact()
    assert time.perf_counter() - t0 < 1.0
    assert art.version == "difficulty-v2"
    assert art.meta["embedding"]["kind"] == "static"
    assert art.thresholds("knn") is not None and art.thresholds("heuristic") is not None
    medium, hard = art.thresholds("knn")
    assert 0.0 <= medium <= hard <= 1.0


def test_v1_minilm_artefact_still_loads():
    art = load_artefact(SHIPPED_MINILM)
    assert art.version == "difficulty-v1"
    assert "kind" not in art.meta["embedding"]  # predates the field: read as the transformer


def test_shipped_artefact_records_its_selection_protocol():
    training = load_artefact().meta["training"]
    assert training["selection"].startswith("8-fold grouped CV")
    # chosen without the test part: the test AUC is a report, not an input
    assert {"cv_auc", "cv_auc_heuristic", "test_auc", "test_auc_heuristic"} <= set(training)


def test_tampered_arrays_are_refused(tmp_path):
    meta = json.loads(SHIPPED.read_text())
    shutil.copy(SHIPPED, tmp_path / SHIPPED.name)
    data = bytearray((SHIPPED.parent / meta["arrays"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / meta["arrays"]).write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match="does not match"):
        load_artefact(tmp_path / SHIPPED.name)


def _fallbacks(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "difficulty_knn_unavailable" and e["log_level"] == "warning"]


def test_missing_artefact_falls_back_to_heuristic_with_warning(tmp_path):
    with capture_logs() as logs:
        clf = build_difficulty_classifier(DifficultyConfig(method="knn", artefact=str(tmp_path / "none.json")))
    assert isinstance(clf, HeuristicDifficultyClassifier)
    [fallback] = _fallbacks(logs)
    assert fallback["fallback"] == "heuristic"
    assert any("none.json" in e["error"] for e in logs if e["event"] == "difficulty_artefact_unusable")
    finding = clf.classify(body("What is 2 + 2?"))
    assert finding.method == "heuristic"
    assert "knn unavailable" in finding.evidence["fallback"]


def test_missing_model_package_falls_back_to_heuristic_with_warning():
    with capture_logs() as logs:
        clf = build_difficulty_classifier(DifficultyConfig(method="knn", embedding_package="no_such_minilm_pkg"))
    assert isinstance(clf, HeuristicDifficultyClassifier)
    [fallback] = _fallbacks(logs)
    assert "no_such_minilm_pkg" in fallback["reason"]
    # with the artefact present, the heuristic still uses its shipped calibration
    assert (clf.medium, clf.hard) == load_artefact().thresholds("heuristic")
    assert clf.classify(body("hello")).level in ("easy", "medium", "hard")
