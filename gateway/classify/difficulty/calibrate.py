"""Thresholds from a target traffic mix, and the routing numbers the `eval` command prints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def calibrate(scores: np.ndarray, cloud_share: float, medium_share: float) -> dict[str, float]:
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
    }


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
