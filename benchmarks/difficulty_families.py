"""Issue #21, "on every dataset family": leave-one-family-out AUC and cloud share for 95% of GPT-4.

    /work/bin/benchslot .venv/bin/python benchmarks/difficulty_families.py   # ~1-2 min on 2 busy cores

The routing data has two datasets, GSM8K and MMLU; MMLU's 40 subjects fall into the four groups
its authors publish (STEM, humanities, social sciences, other: business, health, misc.). That gives
five families. Each is held out whole in turn: every option is fitted on the other four and scored
on it, so no subject, and no kind of subject, of the scored family was seen in fitting. A router
that only learned "maths is hard for Mixtral" shows it here (GSM8K held out: it never saw a word
problem).

Options (features exactly as serving reads them: signals.read, difficulty_head.features):
  heuristic     the model-free method as served (heuristic logit + the everyday cues' shifts);
                nothing fitted, the same on every fold.
  v2-recipe     the shipped recipe refitted: logistic layer over MiniLM's static embedding +
                standardised signals, plus the everyday cues' hand-set shifts.
  head+cues     one logistic layer over embedding + signals + cue indicators (cue weights learned).
  stack         a calibrated combination: the embedding head's logit, out-of-fold on the training
                families (grouped 5-fold, so its weight is what the head is worth on an unseen
                family), beside the heuristic logit, the standardised signals and the cue
                indicators in a second, small logistic layer (34 weights).
  gain          head+cues fitted on another label: "routing it to GPT-4 turns a wrong answer into a
                right one" (weak wrong and GPT-4 right), the prompts that buy quality.
  net-gain      the expected gain of routing: P(weak wrong, GPT-4 right) − P(weak right, GPT-4
                wrong), two such heads. On MMLU STEM GPT-4 is right on only 69%: many prompts
                Mixtral fails GPT-4 fails too, so "weak fails" is not what is worth sending.

Per family and option: ROC AUC for "weak model (Mixtral-8x7B) fails", the GPT-4 share needed for
95% of GPT-4's accuracy, random routing's share, the gap in points, and whether the gap meets the
issue's "at least 10 points below random". RouteLLM's published figures (best router, trained on
other data) sit beside the MMLU and GSM8K rows: the same metric, not the same test set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from difficulty_head import Report, _standardise, features, labelled  # noqa: E402

from gateway.classify.difficulty.calibrate import share_for_quality  # noqa: E402
from gateway.classify.difficulty.heuristic import heuristic_logit  # noqa: E402
from gateway.classify.difficulty.signals import read  # noqa: E402
from gateway.classify.difficulty.train import auc, one_thread  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "difficulty_families.txt"
C = 0.3  # the shipped recipe's L2 strength; no grid here, no chance to fit the held-out family
GOAL_POINTS = 0.10  # issue #21: cloud share at least 10 points below random routing
# RouteLLM (Ong et al. 2024): GPT-4 share for 95% of GPT-4 quality with their best router.
ROUTELLM = {"gsm8k": "~65% (cost -35%)", "mmlu": "~55% (cost -45%)"}

# MMLU's published subject groups (hendrycks/test, categories.py), for the subjects in the data.
_STEM = ("college_biology college_chemistry college_computer_science conceptual_physics electrical_engineering "
         "high_school_biology high_school_chemistry high_school_computer_science high_school_mathematics "
         "machine_learning")
_HUMANITIES = ("formal_logic high_school_european_history high_school_us_history international_law jurisprudence "
               "moral_disputes philosophy prehistory professional_law world_religions")
_SOCIAL = ("econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
           "high_school_microeconomics human_sexuality public_relations sociology")
_OTHER = ("anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging marketing "
          "medical_genetics miscellaneous professional_accounting professional_medicine virology")
MMLU_GROUP = {s: g for g, names in (("mmlu-stem", _STEM), ("mmlu-humanities", _HUMANITIES),
                                    ("mmlu-social", _SOCIAL), ("mmlu-other", _OTHER)) for s in names.split()}
FAMILIES = ("gsm8k", "mmlu-stem", "mmlu-humanities", "mmlu-social", "mmlu-other")
OPTIONS = ("heuristic", "v2-recipe", "head+cues", "stack", "gain", "net-gain")


def family_of(source: str) -> str:
    if source == "gsm8k":
        return "gsm8k"
    subject = source.removeprefix("mmlu:")
    if subject not in MMLU_GROUP:
        raise ValueError(f"{source}: not in MMLU's published subject groups; add it to MMLU_GROUP")
    return MMLU_GROUP[subject]


def _logistic(x: np.ndarray, y: np.ndarray, c: float = C):
    from sklearn.linear_model import LogisticRegression

    with one_thread():
        return LogisticRegression(C=c, max_iter=5000).fit(x, y)


def _head_x(f: dict[str, np.ndarray], sig: np.ndarray) -> np.ndarray:
    return np.hstack([f["emb"], sig])


def stack_scores(f: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, tr: np.ndarray,
                 te: np.ndarray) -> np.ndarray:
    """Second-level logistic over the head's out-of-fold logit, heuristic logit, signals and cues."""
    from sklearn.model_selection import GroupKFold

    sig = _standardise(f["sig"][tr], f["sig"])
    x = _head_x(f, sig)
    oof = np.zeros(len(tr))
    for a, b in GroupKFold(n_splits=5).split(tr, y[tr], groups[tr]):
        oof[b] = _logistic(x[tr[a]], y[tr[a]]).decision_function(x[tr[b]])
    head_te = _logistic(x[tr], y[tr]).decision_function(x[te])
    second = lambda rows, head: np.hstack([head[:, None], f["heur"][rows, None], sig[rows], f["cues"][rows]])  # noqa: E731
    return _logistic(second(tr, oof), y[tr], c=1.0).decision_function(second(te, head_te))


def option_scores(name: str, f: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray,
                  tr: np.ndarray, te: np.ndarray) -> np.ndarray:
    if name in ("gain", "net-gain"):
        sig = _standardise(f["sig"][tr], f["sig"])
        x = np.hstack([_head_x(f, sig), f["cues"]])
        won = _logistic(x[tr], f["won"][tr]).predict_proba(x[te])[:, 1]
        if name == "gain":
            return won
        return won - _logistic(x[tr], f["lost"][tr]).predict_proba(x[te])[:, 1]
    if name == "heuristic":
        return f["heur"][te] + f["shift"][te]
    if name == "stack":
        return stack_scores(f, y, groups, tr, te)
    sig = _standardise(f["sig"][tr], f["sig"])
    x = _head_x(f, sig) if name == "v2-recipe" else np.hstack([_head_x(f, sig), f["cues"]])
    out = _logistic(x[tr], y[tr]).decision_function(x[te])
    return out + f["shift"][te] if name == "v2-recipe" else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    out = Report(RESULTS, "/work/bin/benchslot .venv/bin/python benchmarks/difficulty_families.py")
    t0 = time.perf_counter()
    examples, prompts, y, groups = labelled()
    weak = np.asarray([e.weak_correct for e in examples], float)
    strong = np.asarray([e.strong_correct for e in examples], float)
    fam = np.asarray([family_of(e.source) for e in examples])
    f = features(prompts, max_tokens=256)
    f["won"] = ((1 - weak) * strong).astype(int)  # routing this prompt to GPT-4 turns wrong into right
    f["lost"] = (weak * (1 - strong)).astype(int)  # ... or right into wrong
    f["heur"] = np.asarray([heuristic_logit(read({"messages": [{"role": "user", "content": p}]}).signals)[0]
                            for p in prompts])
    out(f"# Leave-one-family-out: {len(examples)} prompts, features in {time.perf_counter() - t0:.1f} s")
    out("| family | n | subjects | weak acc | GPT-4 acc |")
    out("|---|---|---|---|---|")
    for fm in FAMILIES:
        m = fam == fm
        out(f"| {fm} | {m.sum()} | {len({examples[i].source for i in np.flatnonzero(m)})} "
            f"| {weak[m].mean():.3f} | {strong[m].mean():.3f} |")
    out()

    scores: dict[str, dict[str, np.ndarray]] = {o: {} for o in OPTIONS}
    for fm in FAMILIES:
        tr, te = np.flatnonzero(fam != fm), np.flatnonzero(fam == fm)
        for o in OPTIONS:
            scores[o][fm] = option_scores(o, f, y, groups, tr, te)

    src = np.asarray([e.source for e in examples])
    rate = {s: y[src == s].mean() for s in np.unique(src)}
    oracle = np.asarray([rate[s] for s in src])  # reads the held-out labels: a reference, not a router
    out("## ROC AUC for 'weak model fails', each family held out (fitted on the other four)")
    out("| family | " + " | ".join(OPTIONS) + " | reference: subject's own failure rate |")
    out("|---|" + "---|" * (len(OPTIONS) + 1))
    for fm in FAMILIES:
        te = fam == fm
        ref = f"{auc(y[te], oracle[te]):.3f}" if len(np.unique(src[te])) > 1 else "— (one source)"
        out(f"| {fm} | " + " | ".join(f"{auc(y[te], scores[o][fm]):.3f}" for o in OPTIONS) + f" | {ref} |")
    pooled = {o: auc(np.concatenate([y[fam == fm] for fm in FAMILIES]),
                     np.concatenate([scores[o][fm] for fm in FAMILIES])) for o in OPTIONS}
    out("| pooled (the five held-out fits' scores together) | " + " | ".join(f"{pooled[o]:.3f}" for o in OPTIONS)
        + f" | {auc(y, oracle):.3f} |")
    out("issue #21 asks for ≥ 0.80 on unseen subjects/datasets. The reference column scores each prompt with "
        "its subject's true failure rate, read from the held-out labels: the ceiling of a router that knows "
        "only the topic. Above it takes telling hard from easy questions within one subject.")
    out()

    out("## GPT-4 share for 95% of GPT-4 accuracy, each family held out (lower is better); "
        "in brackets: points below random routing")
    out("| family | " + " | ".join(OPTIONS) + " | random | RouteLLM published |")
    out("|---|" + "---|" * len(OPTIONS) + "---|---|")
    gaps: dict[str, list[float]] = {o: [] for o in OPTIONS}
    for fm in FAMILIES:
        te = fam == fm
        res = {o: share_for_quality(scores[o][fm], weak[te], strong[te]) for o in OPTIONS}
        rnd = res[OPTIONS[0]][1]
        for o in OPTIONS:
            gaps[o].append(rnd - res[o][0])
        pub = ROUTELLM["gsm8k" if fm == "gsm8k" else "mmlu"]
        out(f"| {fm} | " + " | ".join(f"{res[o][0]:.1%} ({(rnd - res[o][0]) * 100:+.1f})" for o in OPTIONS)
            + f" | {rnd:.1%} | {pub} |")
    out("| families ≥ 10 points below random | "
        + " | ".join(f"{sum(g >= GOAL_POINTS - 1e-9 for g in gaps[o])} of {len(FAMILIES)}" for o in OPTIONS) + " | | |")
    out("Random routing's share is (0.95·GPT-4 − weak) / (GPT-4 − weak) of the family. RouteLLM's "
        "figures are on its own full MMLU / GSM8K runs with routers trained on Arena preference data.")
    out()
    out(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; total {time.perf_counter() - t0:.0f} s")
    if not args.no_save:
        out.save()

if __name__ == "__main__":
    main()
