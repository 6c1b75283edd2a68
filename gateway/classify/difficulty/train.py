"""Fit the `knn` artefact from labelled routing data (the `difficulty train` command).

Protocol: grouped split (data.py). Hyper-parameters are chosen on the validation part (subjects
unseen in training); the test part is touched once, to report. The shipped model is then refitted
on train + validation with the chosen settings, and calibrated on that same data.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.classify.difficulty.calibrate import calibrate
from gateway.classify.difficulty.data import SPLIT_SALT, Example, group_of, sha256_file, split_indices
from gateway.classify.difficulty.embed import MiniLMEmbedder
from gateway.classify.difficulty.heuristic import heuristic_logit, sigmoid
from gateway.classify.difficulty.model import KnnModel, logit
from gateway.classify.difficulty.signals import extract_text_signals, vector

PRIOR_WEIGHT = 5.0  # pseudo-counts pulling a small prototype's failure rate to the overall rate


@dataclass(frozen=True)
class Hyper:
    prototypes: int
    k: int
    temp: float
    c: float  # inverse L2 strength of the logistic fit


# Small on purpose: on unseen subjects the validation AUC moved by < 0.01 across k in {10, 30},
# and a prototype-only kNN by < 0.01 between 256 and 512 prototypes; every extra grid point is one
# more chance to fit the validation subjects.
GRID = [Hyper(256, k, 0.05, c) for k, c in itertools.product((10,), (0.03, 0.1, 0.3))]


def signal_matrix(examples: list[Example]) -> np.ndarray:
    return np.asarray([vector(extract_text_signals(e.prompt)) for e in examples], dtype=np.float32)


def heuristic_scores(examples: list[Example]) -> np.ndarray:
    return np.asarray([sigmoid(heuristic_logit(extract_text_signals(e.prompt))[0]) for e in examples])


def embeddings(examples: list[Example], embedder: MiniLMEmbedder, cache_dir: Path | None,
               data_sha: str) -> np.ndarray:
    """All prompt embeddings, cached on disk by data hash and token cap (embedding is the slow part)."""
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{data_sha}:{embedder.package}:{embedder.max_tokens}".encode()).hexdigest()[:16]
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
        seed: int = 0) -> tuple[KnnModel, dict[str, np.ndarray], np.ndarray]:
    """Fit one model: prototypes, then a logistic layer over embedding, signals and neighbours."""
    from sklearn.linear_model import LogisticRegression

    protos, ph, pn, labels = fit_prototypes(emb, hard, h.prototypes, seed)
    lgo = leave_group_out_rates(protos, labels, emb, hard, groups, h)
    mean, scale = sig.mean(0), sig.std(0) + 1e-6
    x = np.hstack([emb, (sig - mean) / scale, logit(lgo)[:, None]])
    lr = LogisticRegression(C=h.c, max_iter=5000).fit(x, hard)
    coef = lr.coef_[0]
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
        out.append(max(set(members), key=members.count) if members else "")
    return out


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def train(examples: list[Example], data_path: Path, out: Path, embedder: MiniLMEmbedder,
          cache_dir: Path | None, cloud_share: float = 0.3, medium_share: float = 0.3,
          echo: Any = print) -> dict[str, Any]:
    from tqdm import tqdm

    from gateway.classify.difficulty.artefact import save_artefact

    data_sha = sha256_file(data_path)
    emb = embeddings(examples, embedder, cache_dir, data_sha)
    sig = signal_matrix(examples)
    hard = np.asarray([e.hard for e in examples], dtype=int)
    groups = np.asarray([group_of(e) for e in examples])
    parts = split_indices(examples)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    echo(f"split: train {len(tr)}, validation {len(va)}, test {len(te)} (grouped by subject)")

    results = []
    for h in tqdm(GRID, desc="model selection", unit="fit"):
        model, _, _ = fit(emb[tr], sig[tr], hard[tr], groups[tr], h)
        results.append((auc(hard[va], model.logits(emb[va], sig[va])), h))
    best_auc, best = max(results, key=lambda r: r[0])
    for a, h in sorted(results, key=lambda r: -r[0])[:5]:
        echo(f"  val AUC {a:.4f}  {h}")
    model, _, _ = fit(emb[tr], sig[tr], hard[tr], groups[tr], best)
    test_auc = auc(hard[te], model.logits(emb[te], sig[te]))
    heur = heuristic_scores(examples)
    echo(f"chosen {best}: val AUC {best_auc:.4f}, test AUC {test_auc:.4f} "
         f"(heuristic test AUC {auc(hard[te], heur[te]):.4f})")

    final = np.concatenate([tr, va])
    model, arrays, labels = fit(emb[final], sig[final], hard[final], groups[final], best)
    scores = model.scores(emb[final], sig[final])
    meta = {
        "name": "difficulty", "version": 1,
        "embedding": {"package": embedder.package, "model": "sentence-transformers/all-MiniLM-L6-v2",
                      "max_tokens": embedder.max_tokens, "dim": int(emb.shape[1])},
        "knn": {"k": best.k, "temp": best.temp, "prototypes": best.prototypes, "C": best.c},
        "prototype_labels": prototype_labels(labels, [examples[i].source for i in final], best.prototypes),
        "thresholds": {
            "knn": calibrate(scores, cloud_share, medium_share),
            "heuristic": calibrate(heur[final], cloud_share, medium_share),
        },
        "training": {
            "data": data_path.name, "data_sha256": data_sha, "split_salt": SPLIT_SALT,
            "fitted_on": "train+validation", "n_fit": len(final), "n_test": len(te),
            "val_auc": round(best_auc, 4), "test_auc_before_refit": round(test_auc, 4),
            "label": "hard = weak model (Mixtral-8x7B) answered wrongly",
        },
    }
    save_artefact(out, meta, arrays)
    return meta
