"""Difficulty classifier: how likely the local (weak) model is to fail this request.

`build_difficulty_classifier(cfg)` is the seam the runtime calls once per policy load; the object it
returns has `classify(body) -> DifficultyFinding` and is safe to call from several threads.
"""

from __future__ import annotations

import structlog

from gateway.classify.difficulty.artefact import Artefact, ArtefactError, load_artefact
from gateway.classify.difficulty.calibrate import Calibration, CalibrationError, load_calibration
from gateway.classify.difficulty.config import DifficultyConfig, Thresholds
from gateway.classify.difficulty.embed import EmbeddingUnavailable, shared_embedder
from gateway.classify.difficulty.heuristic import DEFAULT_THRESHOLDS, HeuristicDifficultyClassifier
from gateway.classify.difficulty.knn import KnnDifficultyClassifier

__all__ = [
    "DifficultyConfig",
    "HeuristicDifficultyClassifier",
    "KnnDifficultyClassifier",
    "Thresholds",
    "build_difficulty_classifier",
]

log = structlog.get_logger("gateway.classify.difficulty")

DifficultyClassifierImpl = KnnDifficultyClassifier | HeuristicDifficultyClassifier


def _thresholds(cfg: DifficultyConfig, artefact: Artefact | None, method: str) -> tuple[float, float]:
    """The policy's thresholds; else its calibration file's, else the artefact's calibration for the
    method in use; with `cloud_share`, the thresholds giving that share on the calibration's scores."""
    if cfg.thresholds is not None:
        return cfg.thresholds.medium, cfg.thresholds.hard
    cal: Calibration | None = None
    if cfg.calibration is not None:
        try:
            cal = load_calibration(cfg.calibration)  # checked at policy load; it may have changed since
        except CalibrationError as exc:
            log.error("difficulty_calibration_unusable", error=str(exc), using="artefact")
        if cal is not None and cal.method != method:  # knn degraded to heuristic: other scores
            log.warning("difficulty_calibration_other_method", calibration=cal.source, calibrates=cal.method,
                        in_use=method, using="artefact")
            cal = None
    if cal is None and artefact is not None:
        cal = artefact.calibration(method)
    if cal is None:
        if cfg.cloud_share is not None:
            log.error("difficulty_budget_uncalibrated", cloud_share=cfg.cloud_share, using="default thresholds")
        return DEFAULT_THRESHOLDS
    try:
        return cal.thresholds(cfg.cloud_share, cfg.medium_share)
    except CalibrationError as exc:
        log.error("difficulty_budget_uncalibrated", cloud_share=cfg.cloud_share, error=str(exc),
                  using="the calibration's own thresholds")
        return cal.medium, cal.hard


def build_difficulty_classifier(cfg: DifficultyConfig) -> DifficultyClassifierImpl:
    """The configured classifier; `knn` degrades to `heuristic` (logged) instead of failing."""
    artefact: Artefact | None = None
    try:
        artefact = load_artefact(cfg.artefact)
    except ArtefactError as exc:
        if cfg.method == "knn" or cfg.artefact is not None:
            log.warning("difficulty_artefact_unusable", error=str(exc))
    if cfg.method == "heuristic":
        return HeuristicDifficultyClassifier(*_thresholds(cfg, artefact, "heuristic"))
    reason: str | None = None
    if artefact is None:
        reason = "artefact unavailable"
    else:
        emb_meta = artefact.meta["embedding"]
        kind = str(emb_meta.get("kind", "minilm"))  # v1 artefacts predate the field: the transformer
        max_tokens = cfg.max_tokens or int(emb_meta["max_tokens"])
        if cfg.max_tokens and cfg.max_tokens != int(emb_meta["max_tokens"]):
            log.warning("difficulty_max_tokens_differ", max_tokens=cfg.max_tokens,
                        fitted_max_tokens=int(emb_meta["max_tokens"]))
        try:
            if cfg.torch_threads and kind == "minilm":  # the static embedder runs no torch
                import torch

                torch.set_num_threads(cfg.torch_threads)
            embedder = shared_embedder(cfg.embedding_package, max_tokens=max_tokens, kind=kind)
            return KnnDifficultyClassifier(
                artefact, embedder, *_thresholds(cfg, artefact, "knn"), budget_ms=cfg.budget_ms
            )
        except EmbeddingUnavailable as exc:
            reason = str(exc)
    log.warning("difficulty_knn_unavailable", fallback="heuristic", reason=reason)
    return HeuristicDifficultyClassifier(
        *_thresholds(cfg, artefact, "heuristic"), note=f"knn unavailable: {reason}"
    )
