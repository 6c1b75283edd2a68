"""Thresholds from a target traffic mix, and the routing numbers the `eval` command prints.

A calibration records the score distribution it was computed on (QUANTILE_POINTS quantiles), so a
policy can ask for a traffic share ("at most 20% hard": `difficulty.cloud_share`) and get the
thresholds that give it on that distribution without rescoring anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUANTILE_POINTS = 201  # every half percent: a share is met to within ~0.5 points by interpolation
# A threshold no score reaches (scores lie in [0, 1]): what a share of 0 means.
NEVER = 1.000001


def cut_for_share(scores: np.ndarray, share: float) -> float:
    """A threshold t with share(scores >= t) as close to `share` as ties allow."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    n = len(s)
    k = round(share * n)
    if k <= 0:
        return float(min(1.0, s[0] + 1e-9)) if s[0] < 1.0 else 1.0
    if k >= n:
        return float(s[-1])
    # midway between the k-th highest and the next: exactly k scores lie above it when not tied
    return float((s[k - 1] + s[k]) / 2)


def calibrate(scores: np.ndarray, cloud_share: float, medium_share: float) -> dict[str, Any]:
    """hard: the top `cloud_share` of scores; medium: the next `medium_share`."""
    if not 0.0 <= cloud_share <= 1.0 or not 0.0 <= medium_share <= 1.0:
        raise ValueError("shares must lie in [0, 1]")
    hard = cut_for_share(scores, cloud_share)
    medium = min(hard, cut_for_share(scores, min(1.0, cloud_share + medium_share)))
    s = np.asarray(scores)
    return {
        "medium": round(medium, 6),
        "hard": round(hard, 6),
        "cloud_share": cloud_share,
        "medium_share": medium_share,
        "hard_share_observed": round(float((s >= round(hard, 6)).mean()), 4),
        "n": len(s),
        "quantiles": score_quantiles(s),
    }


def score_quantiles(scores: np.ndarray) -> list[float]:
    """The calibration scores at QUANTILE_POINTS evenly spaced quantiles, lowest first."""
    q = np.quantile(np.asarray(scores, dtype=np.float64), np.linspace(0.0, 1.0, QUANTILE_POINTS))
    return [round(float(v), 6) for v in q]


def _cut(quantiles: np.ndarray, share: float) -> float:
    """The score above which `share` of the calibration distribution lies."""
    if share <= 0.0:
        return NEVER
    grid = np.linspace(0.0, 1.0, len(quantiles))
    return float(np.interp(1.0 - min(share, 1.0), grid, quantiles))


def thresholds_for_share(quantiles: list[float], cloud_share: float, medium_share: float) -> tuple[float, float]:
    """(medium, hard) putting `cloud_share` of the calibration scores at hard and the next
    `medium_share` at medium."""
    q = np.asarray(quantiles, dtype=np.float64)
    hard = _cut(q, cloud_share)
    medium = min(hard, _cut(q, cloud_share + medium_share))
    return round(medium, 6), round(hard, 6)


class CalibrationError(ValueError):
    """A calibration file is missing, unreadable or not for this use; the message says which."""


@dataclass(frozen=True)
class Calibration:
    """What `difficulty calibrate` wrote (or an artefact's shipped calibration for one method)."""

    method: str
    medium: float
    hard: float
    quantiles: list[float] | None  # None: written before calibrations recorded their distribution
    source: str

    @classmethod
    def from_dict(cls, d: dict[str, Any], method: str, source: str) -> Calibration:
        try:
            q = d.get("quantiles")
            quantiles = [float(v) for v in q] if q is not None else None
            if quantiles is not None and (len(quantiles) < 2 or quantiles != sorted(quantiles)):
                raise ValueError("quantiles must be at least two ascending numbers")
            return cls(method=method, medium=float(d["medium"]), hard=float(d["hard"]),
                       quantiles=quantiles, source=source)
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{source}: not a difficulty calibration ({exc})") from exc

    def thresholds(self, cloud_share: float | None, medium_share: float) -> tuple[float, float]:
        """Its own thresholds, or those giving `cloud_share` on its distribution."""
        if cloud_share is None:
            return self.medium, self.hard
        if self.quantiles is None:
            raise CalibrationError(f"{self.source}: records no score distribution, so a cloud_share cannot be "
                                   "derived from it; re-run `hybrid-gateway difficulty calibrate`")
        return thresholds_for_share(self.quantiles, cloud_share, medium_share)


def load_calibration(path: str | Path) -> Calibration:
    """A file written by `hybrid-gateway difficulty calibrate`."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{p}: unreadable difficulty calibration ({exc})") from exc
    if not isinstance(d, dict) or not isinstance(d.get("method"), str):
        raise CalibrationError(f"{p}: not a difficulty calibration (no method)")
    return Calibration.from_dict(d, d["method"], str(p))


@dataclass(frozen=True)
class RoutingPoint:
    share: float
    accuracy: float  # routed accuracy: strong's answer for routed prompts, weak's for the rest
    random_accuracy: float  # expected accuracy of random routing at the same share
    pgr: float  # fraction of the strong model's accuracy reached (accuracy / strong accuracy)
    random_pgr: float


def routing_curve(
    scores: np.ndarray, weak: np.ndarray, strong: np.ndarray, shares: list[float]
) -> list[RoutingPoint]:
    """Send the top `share` by score to the strong model; compare with random routing."""
    weak, strong = np.asarray(weak, float), np.asarray(strong, float)
    order = np.argsort(-np.asarray(scores), kind="stable")
    n = len(order)
    acc_strong = strong.mean()
    out = []
    for share in shares:
        k = round(share * n)
        routed = np.zeros(n, bool)
        routed[order[:k]] = True
        acc = float(np.where(routed, strong, weak).mean())
        rnd = float((k / n) * strong.mean() + (1 - k / n) * weak.mean())
        out.append(RoutingPoint(share, acc, rnd, acc / acc_strong, rnd / acc_strong))
    return out


def share_for_quality(
    scores: np.ndarray, weak: np.ndarray, strong: np.ndarray, target: float = 0.95
) -> tuple[float, float]:
    """Smallest strong-model share reaching `target` x strong accuracy: (router, random)."""
    weak, strong = np.asarray(weak, float), np.asarray(strong, float)
    order = np.argsort(-np.asarray(scores), kind="stable")
    n = len(order)
    goal = target * strong.mean()
    # accuracy after routing the top k: weak total + cumulative gain (strong - weak) in score order
    gain = np.concatenate([[0.0], np.cumsum((strong - weak)[order])])
    acc = (weak.sum() + gain) / n
    k = int(np.argmax(acc >= goal - 1e-12)) if (acc >= goal - 1e-12).any() else n
    wm, sm = weak.mean(), strong.mean()
    rnd = 1.0 if sm == wm else float(np.clip((goal - wm) / (sm - wm), 0.0, 1.0))
    return k / n, rnd
