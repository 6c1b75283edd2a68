"""The `knn` score as plain numpy, shared by training, evaluation and serving (one code path).

    logit = b + w_emb · e + w_sig · z(signals) + w_knn · logit(neighbour hard rate)

e is the unit MiniLM embedding; z standardises the heuristic signals; the neighbour hard rate is
the similarity-weighted share of "weak model failed" among the k nearest prototypes (k-means
centroids of the training embeddings, each with its smoothed failure rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gateway.classify.difficulty.signals import SIGNAL_NAMES

EPS = 1e-3
# A signal whose spread in the training data is below this (no code, tools, second turns or
# non-English text in MMLU + GSM8K) taught the logistic layer nothing: its fitted weight is noise,
# and standardising by a near-zero spread turned one extra user turn into a logit of ~40,000
# (every multi-turn chat scored 1.0). Such signals contribute nothing here; the cue layer
# (cues.py) speaks for them.
MIN_SIGNAL_SCALE = 0.05
# The signal vector of a single-turn English prompt with no code or tools (see signals.vector).
BASELINE_SIGNALS = np.asarray([math.log1p(1.0) if n == "turns" else 0.0 for n in SIGNAL_NAMES], np.float32)


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def neighbour_rate(
    protos: np.ndarray, proto_hard: np.ndarray, emb: np.ndarray, k: int, temp: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of emb (n, d): hard rate (n,), nearest prototype ids (n, k), similarities (n, k)."""
    sims = emb @ protos.T
    k = min(k, protos.shape[0])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # stable: ties break the same way every run
    ts = np.take_along_axis(sims, top, 1)
    w = np.exp((ts - ts[:, :1]) / temp)
    rate = (w * proto_hard[top]).sum(1) / w.sum(1)
    return rate, top, ts


@dataclass(frozen=True)
class KnnModel:
    sig_mean: np.ndarray
    sig_scale: np.ndarray
    w_emb: np.ndarray
    w_sig: np.ndarray
    w_knn: float
    intercept: float
    protos: np.ndarray  # (P, d) float32, unit rows
    proto_hard: np.ndarray  # (P,)
    proto_n: np.ndarray  # (P,)
    k: int
    temp: float

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], k: int, temp: float) -> KnnModel:
        f32 = np.float32
        scale = a["sig_scale"].astype(f32)
        usable = scale >= MIN_SIGNAL_SCALE
        # What an unusable signal added for the request nearly every training row was (one turn, no
        # tools, code or non-English text) stays in the intercept: v2 gave every single-turn prompt
        # -0.109 through `turns`, and dropping it would move every score past its calibration.
        z0 = (BASELINE_SIGNALS - a["sig_mean"].astype(f32)) / scale
        offset = float(np.where(usable, 0.0, z0 * a["w_sig"]).sum())
        return cls(
            sig_mean=a["sig_mean"].astype(f32), sig_scale=np.where(usable, scale, 1.0).astype(f32),
            w_emb=a["w_emb"].astype(f32), w_sig=np.where(usable, a["w_sig"], 0.0).astype(f32),
            w_knn=float(np.asarray(a["w_knn"]).reshape(-1)[0]),
            intercept=float(np.asarray(a["intercept"]).reshape(-1)[0]) + offset,
            protos=a["protos"].astype(f32), proto_hard=a["proto_hard"].astype(f32),
            proto_n=a["proto_n"].astype(np.int32), k=k, temp=temp,
        )

    def parts(self, emb: np.ndarray, sig: np.ndarray) -> dict[str, np.ndarray]:
        """Per-row logit contributions and neighbours for embeddings (n, d) and signal vectors (n, s)."""
        z = (sig - self.sig_mean) / self.sig_scale
        rate, top, sims = neighbour_rate(self.protos, self.proto_hard, emb, self.k, self.temp)
        return {
            "embedding": emb @ self.w_emb,
            "signals": z * self.w_sig,  # (n, s): per-signal contributions
            "neighbours": self.w_knn * logit(rate),
            "rate": rate, "top": top, "sims": sims,
        }

    def logits(self, emb: np.ndarray, sig: np.ndarray) -> np.ndarray:
        p = self.parts(emb, sig)
        return self.intercept + p["embedding"] + p["signals"].sum(1) + p["neighbours"]

    def scores(self, emb: np.ndarray, sig: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(emb, sig)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60 else 0.0
