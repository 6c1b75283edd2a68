"""Fit the `knn` artefact from labelled routing data (the `difficulty train` command).

Protocol: grouped split (data.py). The test part (subjects never used for fitting or choosing) is
set aside. Hyper-parameters (L2 strength, whether the neighbour feature is used) are chosen by
grouped k-fold cross-validation over train + validation: every fold holds out whole subjects, so
the score that picks them is a score on unseen subjects, and it averages over 8 folds instead of
one 8-subject validation part. Test is read once, to report; the shipped model is fitted on
train + validation with the chosen settings and calibrated on that same data.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.classify.difficulty.calibrate import calibrate
from gateway.classify.difficulty.cues import cue_shift
from gateway.classify.difficulty.data import SPLIT_SALT, Example, group_of, sha256_file, split_indices
from gateway.classify.difficulty.embed import Embedder
from gateway.classify.difficulty.heuristic import heuristic_logit, sigmoid
from gateway.classify.difficulty.model import MIN_SIGNAL_SCALE, KnnModel, logit
from gateway.classify.difficulty.signals import extract_text_signals, vector

ARTEFACT_VERSION = 2
PRIOR_WEIGHT = 5.0  # pseudo-counts pulling a small prototype's failure rate to the overall rate


@dataclass(frozen=True)
class Hyper:
    prototypes: int
    k: int
    temp: float
    c: float  # inverse L2 strength of the logistic fit
    neighbours: bool = True  # feed the prototypes' hard rate to the logistic layer (else evidence only)


# Small on purpose: on unseen subjects the validation AUC moved by < 0.01 across k in {10, 30},
# and a prototype-only kNN by < 0.01 between 256 and 512 prototypes; every extra grid point is one
# more chance to fit the held-out subjects.
GRID = [Hyper(256, 10, 0.05, c, nb) for nb, c in itertools.product((True, False), (0.1, 0.3, 1.0))]
CV_FOLDS = 8


def one_thread() -> Any:
    """BLAS / OpenMP limited to one thread. Measured here with other jobs on the 2 cores: k-means
    23.6 s vs 145 s and the logistic fit 2.6 s vs 23.2 s: threads that wait at barriers for a
    descheduled sibling cost far more than the second core gives."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def signal_matrix(examples: list[Example]) -> np.ndarray:
    return np.asarray([vector(extract_text_signals(e.prompt)) for e in examples], dtype=np.float32)


def heuristic_scores(examples: list[Example]) -> np.ndarray:
    return np.asarray([sigmoid(heuristic_logit(extract_text_signals(e.prompt))[0]) for e in examples])


def embeddings(examples: list[Example], embedder: Embedder, cache_dir: Path | None,
               data_sha: str) -> np.ndarray:
    """All prompt embeddings, cached on disk by data hash and token cap (embedding is the slow part)."""
    cache = None
    if cache_dir is not None:
        # v1 (minilm) cache keys had no kind: keep them so its cached embeddings stay valid
        kind = "" if embedder.kind == "minilm" else f":{embedder.kind}"
        key = hashlib.sha256(f"{data_sha}:{embedder.package}:{embedder.max_tokens}{kind}".encode()).hexdigest()[:16]
        cache = cache_dir / f"difficulty-emb-{key}.npy"
        if cache.is_file():
            return np.load(cache)
    out = embedder.embed_many([e.prompt for e in examples], progress=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, out)
    return out


def fit_prototypes(emb: np.ndarray, hard: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """k-means centroids (unit rows), their smoothed failure rate and size, and each row's centroid."""
    from sklearn.cluster import KMeans

    n = min(n, max(1, len(emb) // 4))  # at least ~4 prompts per prototype on small data
    # 50 Lloyd iterations are plenty for a neighbour prior and keep a fit to seconds on 2 cores
    with one_thread():
        km = KMeans(n, n_init=1, max_iter=50, random_state=seed).fit(emb)
    centres = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
    count = np.bincount(km.labels_, minlength=n)
    fails = np.bincount(km.labels_, weights=hard.astype(float), minlength=n)
    rate = (fails + PRIOR_WEIGHT * hard.mean()) / (count + PRIOR_WEIGHT)
    return centres.astype(np.float32), rate.astype(np.float32), count.astype(np.int32), km.labels_


def leave_group_out_rates(protos: np.ndarray, labels: np.ndarray, emb: np.ndarray, hard: np.ndarray,
                          groups: np.ndarray, h: Hyper) -> np.ndarray:
    """Neighbour hard rate of each training row, with its own group's examples removed from every
    prototype's statistics: the logistic layer then sees what neighbours are worth on a subject
    that is not in the prototypes, as at serving time on the held-back subjects."""
    from gateway.classify.difficulty.model import neighbour_rate

    n = protos.shape[0]
    prior = hard.mean()
    count = np.bincount(labels, minlength=n).astype(float)
    fails = np.bincount(labels, weights=hard.astype(float), minlength=n)
    out = np.zeros(len(emb))
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        c = count - np.bincount(labels[rows], minlength=n)
        f = fails - np.bincount(labels[rows], weights=hard[rows].astype(float), minlength=n)
        rate = (f + PRIOR_WEIGHT * prior) / (c + PRIOR_WEIGHT)
        out[rows] = neighbour_rate(protos, rate.astype(np.float32), emb[rows], h.k, h.temp)[0]
    return out


def fit(emb: np.ndarray, sig: np.ndarray, hard: np.ndarray, groups: np.ndarray, h: Hyper,
        seed: int = 0, prototypes: tuple[np.ndarray, ...] | None = None,
        ) -> tuple[KnnModel, dict[str, np.ndarray], np.ndarray]:
    """Fit one model: prototypes (unless given: k-means is the slow part, and model selection
    reuses one clustering per fold), then a logistic layer over embedding, signals and neighbours."""
    from sklearn.linear_model import LogisticRegression

    protos, ph, pn, labels = prototypes or fit_prototypes(emb, hard, h.prototypes, seed)
    mean, scale = sig.mean(0), sig.std(0) + 1e-6
    # a signal without spread here gets no weight (model.MIN_SIGNAL_SCALE: serving ignores it too)
    x = np.hstack([emb, np.where(scale >= MIN_SIGNAL_SCALE, (sig - mean) / scale, 0.0)])
    if h.neighbours:
        lgo = leave_group_out_rates(protos, labels, emb, hard, groups, h)
        x = np.hstack([x, logit(lgo)[:, None]])
    with one_thread():
        lr = LogisticRegression(C=h.c, max_iter=5000).fit(x, hard)
    # without the neighbour feature its weight is 0: the prototypes remain, as evidence only
    coef = lr.coef_[0] if h.neighbours else np.append(lr.coef_[0], 0.0)
    d, s = emb.shape[1], sig.shape[1]
    arrays = {
        "sig_mean": mean.astype(np.float32), "sig_scale": scale.astype(np.float32),
        "w_emb": coef[:d].astype(np.float32), "w_sig": coef[d : d + s].astype(np.float32),
        "w_knn": np.asarray([coef[-1]], np.float32), "intercept": np.asarray([lr.intercept_[0]], np.float32),
        # float16 halves the artefact; cosine similarities move by < 1e-3
        "protos": protos.astype(np.float16), "proto_hard": ph, "proto_n": pn,
    }
    return KnnModel.from_arrays(arrays, k=h.k, temp=h.temp), arrays, labels


def prototype_labels(labels: np.ndarray, sources: list[str], n: int) -> list[str]:
    """A short topic name per prototype: its most common source (e.g. "mmlu:virology")."""
    out = []
    for p in range(n):
        members = [sources[i] for i in np.flatnonzero(labels == p)]
        # sorted: ties go to the first name, not to set order (which varies with PYTHONHASHSEED)
        out.append(max(sorted(set(members)), key=members.count) if members else "")
    return out


def grouped_cv_heuristic(heur: np.ndarray, hard: np.ndarray, groups: np.ndarray,
                         folds: int = CV_FOLDS) -> list[float]:
    """The heuristic's AUC on the same held-out folds: the baseline the CV scores are read against."""
    from sklearn.model_selection import GroupKFold

    n = min(folds, len(np.unique(groups)))
    out = []
    for tr, te in GroupKFold(n_splits=n).split(heur, hard, groups):
        if 0 < hard[te].sum() < len(te) and 0 < hard[tr].sum() < len(tr):  # the folds the model used
            out.append(auc(hard[te], heur[te]))
    return out


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def grouped_cv_auc(emb: np.ndarray, sig: np.ndarray, hard: np.ndarray, groups: np.ndarray,
                   grid: list[Hyper], folds: int = CV_FOLDS, progress: bool = False) -> list[float]:
    """Mean AUC of each setting over folds that each hold out whole groups (subjects)."""
    return [float(np.mean(p)) if p else float("nan")
            for p in grouped_cv_fold_aucs(emb, sig, hard, groups, grid, folds, progress)]


def grouped_cv_fold_aucs(emb: np.ndarray, sig: np.ndarray, hard: np.ndarray, groups: np.ndarray,
                         grid: list[Hyper], folds: int = CV_FOLDS, progress: bool = False) -> list[list[float]]:
    """Per setting, the AUC on each fold; a fold holds out whole groups (subjects), folds with one
    class are skipped. One k-means per fold and prototype count, shared by the settings."""
    from sklearn.model_selection import GroupKFold

    n = min(folds, len(np.unique(groups)))
    per: list[list[float]] = [[] for _ in grid]
    splits = list(GroupKFold(n_splits=n).split(emb, hard, groups))
    if progress:
        from tqdm import tqdm

        splits = tqdm(splits, desc="grouped CV", unit="fold")
    for tr, te in splits:
        if not (0 < hard[te].sum() < len(te) and 0 < hard[tr].sum() < len(tr)):
            continue
        clusterings: dict[int, tuple[np.ndarray, ...]] = {}
        for i, h in enumerate(grid):
            if h.prototypes not in clusterings:
                clusterings[h.prototypes] = fit_prototypes(emb[tr], hard[tr], h.prototypes)
            model, _, _ = fit(emb[tr], sig[tr], hard[tr], groups[tr], h, prototypes=clusterings[h.prototypes])
            per[i].append(auc(hard[te], model.logits(emb[te], sig[te])))
    return per


def train(examples: list[Example], data_path: Path, out: Path, embedder: Embedder,
          cache_dir: Path | None, cloud_share: float = 0.3, medium_share: float = 0.3,
          echo: Any = print) -> dict[str, Any]:
    from gateway.classify.difficulty.artefact import save_artefact

    data_sha = sha256_file(data_path)
    emb = embeddings(examples, embedder, cache_dir, data_sha)
    sig = signal_matrix(examples)
    hard = np.asarray([e.hard for e in examples], dtype=int)
    groups = np.asarray([group_of(e) for e in examples])
    parts = split_indices(examples)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    final = np.sort(np.concatenate([tr, va]))
    echo(f"split: train {len(tr)}, validation {len(va)}, test {len(te)} (grouped by subject); "
         f"model selection: {CV_FOLDS}-fold grouped CV over train + validation ({len(final)} prompts)")

    per_fold = grouped_cv_fold_aucs(emb[final], sig[final], hard[final], groups[final], GRID, progress=True)
    cv = [float(np.mean(p)) if p else float("nan") for p in per_fold]
    results = list(zip(cv, GRID, strict=True))
    best_auc, best = max(results, key=lambda r: r[0])
    for a, h in sorted(results, key=lambda r: -r[0]):
        echo(f"  grouped-CV AUC {a:.4f}  {h}")
    heur = heuristic_scores(examples)
    heur_folds = grouped_cv_heuristic(heur[final], hard[final], groups[final])
    heur_cv = float(np.mean(heur_folds)) if heur_folds else float("nan")
    best_folds = per_fold[GRID.index(best)]
    won = sum(a > h for a, h in zip(best_folds, heur_folds, strict=True))
    echo("  chosen vs heuristic per fold: " + ", ".join(
        f"{a:.3f}/{h:.3f}" for a, h in zip(best_folds, heur_folds, strict=True)) + f" ({won} of {len(best_folds)} won)")
    model, arrays, labels = fit(emb[final], sig[final], hard[final], groups[final], best)
    test_auc = auc(hard[te], model.logits(emb[te], sig[te])) if 0 < hard[te].sum() < len(te) else float("nan")
    heur_test = auc(hard[te], heur[te]) if 0 < hard[te].sum() < len(te) else float("nan")
    echo(f"chosen {best}: grouped-CV AUC {best_auc:.4f} (heuristic, same folds: {heur_cv:.4f}); "
         f"test AUC {test_auc:.4f} (heuristic {heur_test:.4f})")

    # Thresholds calibrate what serving scores: the fitted logit moved by the everyday cues
    shift = np.asarray([cue_shift(examples[i].prompt) for i in final])
    scores = 1.0 / (1.0 + np.exp(-(model.logits(emb[final], sig[final]) + shift)))
    heur_served = 1.0 / (1.0 + np.exp(-(logit(heur[final]) + shift)))
    meta = {
        "name": "difficulty", "version": ARTEFACT_VERSION,
        "embedding": {"kind": embedder.kind, "package": embedder.package,
                      "model": "sentence-transformers/all-MiniLM-L6-v2",
                      "max_tokens": embedder.max_tokens, "dim": int(emb.shape[1])},
        "knn": {"k": best.k, "temp": best.temp, "prototypes": best.prototypes, "C": best.c,
                "neighbours": best.neighbours},
        "prototype_labels": prototype_labels(labels, [examples[i].source for i in final], best.prototypes),
        "thresholds": {
            "knn": calibrate(scores, cloud_share, medium_share),
            "heuristic": calibrate(heur_served, cloud_share, medium_share),
        },
        "training": {
            "data": data_path.name, "data_sha256": data_sha, "split_salt": SPLIT_SALT,
            "fitted_on": "train+validation", "n_fit": len(final), "n_test": len(te),
            "selection": f"{CV_FOLDS}-fold grouped CV (by subject) over train+validation",
            "cv_auc": round(best_auc, 4), "cv_auc_heuristic": round(heur_cv, 4),
            "cv_folds_won_vs_heuristic": f"{won} of {len(best_folds)}",
            "test_auc": round(test_auc, 4), "test_auc_heuristic": round(heur_test, 4),
            "label": "hard = weak model (Mixtral-8x7B) answered wrongly",
        },
    }
    save_artefact(out, meta, arrays)
    return meta
