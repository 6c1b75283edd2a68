"""The `knn` method: MiniLM embedding + fitted artefact, blended with the heuristic signals, then
moved by the everyday cues a user would cite (cues.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import structlog

from gateway.classify.difficulty.artefact import Artefact
from gateway.classify.difficulty.cues import detect, reasons
from gateway.classify.difficulty.embed import Embedder
from gateway.classify.difficulty.heuristic import level_for
from gateway.classify.difficulty.model import KnnModel, sigmoid
from gateway.classify.difficulty.signals import SIGNAL_NAMES, read, vector
from gateway.features import DifficultyFinding

log = structlog.get_logger("gateway.classify.difficulty")


class KnnDifficultyClassifier:
    """Thread-safe: the model arrays are read-only and the embedder serialises its forward pass."""

    method = "knn"

    def __init__(
        self, artefact: Artefact, embedder: Embedder, medium: float, hard: float, budget_ms: float
    ) -> None:
        knn = artefact.meta["knn"]
        self.model = KnnModel.from_arrays(artefact.arrays, k=int(knn["k"]), temp=float(knn["temp"]))
        self.labels: list[str] = list(artefact.meta.get("prototype_labels") or [])
        self.version = artefact.version
        self.embedder = embedder
        # With static embeddings a classification is ~0.5 ms of numpy: cheaper to run on the event
        # loop than to hand off to a thread (gateway/classify/base.py). The transformer is not.
        self.runs_inline = embedder.kind == "static"
        self.medium, self.hard = medium, hard
        self.budget_ms = budget_ms
        self._slow = 0
        self._slow_logged_at = -1e9
        self._slow_lock = threading.Lock()

    def _over_budget(self, elapsed_ms: float) -> None:
        """Count slow classifications; log at most once a minute so a busy CPU does not flood logs."""
        with self._slow_lock:
            self._slow += 1
            now = time.monotonic()
            if now - self._slow_logged_at < 60:
                return
            self._slow_logged_at, count, self._slow = now, self._slow, 0
        log.warning("difficulty_over_budget", elapsed_ms=round(elapsed_ms, 1), budget_ms=self.budget_ms,
                    slow_since_last_report=count,
                    hint="with the minilm artefact, consider difficulty.torch_threads: 1 on a busy machine")

    def score_many(self, texts: list[str], sigs: np.ndarray, progress: bool = False) -> np.ndarray:
        """Fitted scores (no cues) for many prompts at once: the artefact's own numbers."""
        return self.model.scores(self.embedder.embed_many(texts, progress=progress), sigs)

    def score_bodies(self, bodies: list[dict[str, Any]], progress: bool = False) -> np.ndarray:
        """What `classify` scores, for many requests at once (evaluation and calibration)."""
        reads = [read(b) for b in bodies]
        sigs = np.asarray([vector(r.signals) for r in reads], dtype=np.float32)
        emb = self.embedder.embed_many([r.embedding_text for r in reads], progress=progress)
        shift = np.asarray([sum(c.weight for c in detect(r.text, turns=r.signals.turns)) for r in reads])
        return 1.0 / (1.0 + np.exp(-(self.model.logits(emb, sigs) + shift)))

    def classify(self, body: dict[str, Any]) -> DifficultyFinding:
        t0 = time.perf_counter()
        r = read(body)
        s = r.signals
        cues = detect(r.text, turns=s.turns)
        emb = self.embedder.embed(r.embedding_text)[None, :]
        sig = np.asarray([vector(s)], dtype=np.float32)
        p = self.model.parts(emb, sig)
        fitted = (self.model.intercept + float(p["embedding"][0]) + float(p["signals"][0].sum())
                  + float(p["neighbours"][0]))
        score = sigmoid(fitted + sum(c.weight for c in cues))
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if elapsed_ms > self.budget_ms:
            self._over_budget(elapsed_ms)
        sig_contrib = {n: round(float(c), 4) for n, c in zip(SIGNAL_NAMES, p["signals"][0], strict=True)
                       if abs(c) >= 0.01}
        neighbours = [
            {"prototype": int(i), "topic": self.labels[i] if i < len(self.labels) else None,
             "similarity": round(float(sim), 3), "hard_rate": round(float(self.model.proto_hard[i]), 3),
             "examples": int(self.model.proto_n[i])}
            for i, sim in zip(p["top"][0][:3], p["sims"][0][:3], strict=True)
        ]
        evidence: dict[str, Any] = {
            "reasons": reasons(cues) or [self._fitted_reason(neighbours)],
            "cues": {c.name: c.weight for c in cues},
            "fitted_score": round(sigmoid(fitted), 6),
            "signals": {k: v for k, v in s.as_dict().items() if v},
            "contributions": {
                "intercept": round(self.model.intercept, 4),
                "embedding": round(float(p["embedding"][0]), 4),
                "neighbours": round(float(p["neighbours"][0]), 4),
                "signals": sig_contrib,
            },
            "neighbour_hard_rate": round(float(p["rate"][0]), 4),
            "neighbours": neighbours,
            "thresholds": {"medium": self.medium, "hard": self.hard},
            "artefact": self.version,
        }
        return DifficultyFinding(
            level=level_for(score, self.medium, self.hard), score=round(score, 6), method=self.method,
            evidence=evidence,
        )

    @staticmethod
    def _fitted_reason(neighbours: list[dict[str, Any]]) -> str:
        """No everyday cue: say what the fitted score rests on, in words."""
        top = neighbours[0] if neighbours else None
        if top is None or not top["topic"]:
            return "no everyday cue: the fitted score alone"
        topic = str(top["topic"]).removeprefix("mmlu:").replace("_", " ")
        return f"resembles {topic} questions, which the local model gets wrong {top['hard_rate']:.0%} of the time"
