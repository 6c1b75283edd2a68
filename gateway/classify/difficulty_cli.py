"""`hybrid-gateway difficulty train | calibrate | eval`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MAX_TOKENS = {"static": 256, "minilm": 128}
SHARES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def read_prompts(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Request bodies and the raw rows from JSONL: rows with `prompt`, `turns` (MT-Bench: the first
    turn) or `messages` (a chat request)."""
    p = Path(path)
    if not p.is_file():
        _fail(f"{p}: no such data file")
    bodies, rows = [], []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(f"{p}:{lineno}: not JSON ({exc.msg})")
        if "messages" in row:
            body = {"messages": row["messages"], "tools": row.get("tools")}
        elif "prompt" in row:
            body = {"messages": [{"role": "user", "content": str(row["prompt"])}]}
        elif row.get("turns"):
            body = {"messages": [{"role": "user", "content": str(row["turns"][0])}]}
        else:
            _fail(f"{p}:{lineno}: expected a `prompt`, `turns` or `messages` field")
        bodies.append(body)
        rows.append(row)
    if not bodies:
        _fail(f"{p}: no prompts")
    return bodies, rows


def score_bodies(clf: Any, bodies: list[dict[str, Any]]) -> np.ndarray:
    """Scores for many requests: batched embedding for knn (same model as `classify`)."""
    from tqdm import tqdm

    from gateway.classify.difficulty import KnnDifficultyClassifier

    if isinstance(clf, KnnDifficultyClassifier):
        return clf.score_bodies(bodies, progress=True)
    return np.asarray([clf.score(b)[0] for b in tqdm(bodies, desc="scoring", unit="prompt")])


def _build(method: str, artefact: str | None) -> Any:
    from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier

    clf = build_difficulty_classifier(DifficultyConfig(method=method, artefact=artefact))
    if clf.method != method:
        click.echo(f"warning: method {method} unavailable, using {clf.method}", err=True)
    return clf


@click.group("difficulty")
def difficulty() -> None:
    """Fit, calibrate and evaluate the difficulty classifier."""


@difficulty.command()
@click.option("--data", required=True, type=click.Path(), help="Labelled JSONL (prompt, source, weak_correct, strong_correct).")
@click.option("--out", default=None, type=click.Path(), help="Artefact metadata path [default: the shipped one].")
@click.option("--cache", default="benchmarks/.work", show_default=True, type=click.Path(), help="Embedding cache dir ('' for none).")
@click.option("--embedding", type=click.Choice(["static", "minilm"]), default="static", show_default=True,
              help="static: MiniLM's input word-piece embeddings, mean-pooled (~0.2 ms); minilm: the transformer (~30 ms).")
@click.option("--max-tokens", default=None, type=int, help="Word pieces embedded [default: 256 static, 128 minilm].")
@click.option("--cloud-share", default=0.3, show_default=True, type=float, help="Calibrate the shipped thresholds to this hard share.")
def train(data: str, out: str | None, cache: str, embedding: str, max_tokens: int | None, cloud_share: float) -> None:
    """Fit the knn artefact: grouped-CV model selection over train + validation; report the test split."""
    from gateway.classify.difficulty.artefact import SHIPPED
    from gateway.classify.difficulty.data import DataError, load_examples
    from gateway.classify.difficulty.embed import EMBEDDERS, EmbeddingUnavailable
    from gateway.classify.difficulty.train import train as run

    try:
        examples = load_examples(data)
        embedder = EMBEDDERS[embedding](max_tokens=max_tokens or DEFAULT_MAX_TOKENS[embedding])
    except (DataError, EmbeddingUnavailable) as exc:
        _fail(str(exc))
    target = Path(out) if out else SHIPPED
    meta = run(examples, Path(data), target, embedder, Path(cache) if cache else None,
               cloud_share=cloud_share, echo=click.echo)
    size = target.with_suffix(".npz").stat().st_size
    click.echo(f"wrote {target} and {target.with_suffix('.npz').name} ({size / 1024:.0f} KiB, sha256 {meta and json.loads(target.read_text())['sha256'][:12]}…)")


@difficulty.command("calibrate")
@click.option("--data", required=True, type=click.Path(), help="JSONL of prompts representative of your traffic.")
@click.option("--cloud-share", required=True, type=click.FloatRange(0, 1), help="Share of traffic to mark hard.")
@click.option("--medium-share", default=0.3, show_default=True, type=click.FloatRange(0, 1), help="Share marked medium (below hard).")
@click.option("--method", type=click.Choice(["knn", "heuristic"]), default="knn", show_default=True)
@click.option("--artefact", default=None, type=click.Path(), help="Artefact metadata [default: shipped].")
@click.option("--out", default="policies/difficulty.json", show_default=True, type=click.Path())
def calibrate_cmd(data: str, cloud_share: float, medium_share: float, method: str, artefact: str | None,
                  out: str) -> None:
    """Pick thresholds so that --cloud-share of DATA is `hard`."""
    from gateway.classify.difficulty.calibrate import calibrate

    bodies, _ = read_prompts(data)
    clf = _build(method, artefact)
    result = {"method": clf.method, "data": str(data), **calibrate(score_bodies(clf, bodies), cloud_share, medium_share)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}: {result['hard_share_observed']:.1%} of {result['n']} prompts hard")
    click.echo("policy snippet (these thresholds as they are):\n"
               f"difficulty:\n  method: {clf.method}\n  thresholds: {{medium: {result['medium']}, hard: {result['hard']}}}")
    click.echo("or, to set the budget in the policy (thresholds follow from this file's score distribution):\n"
               f"difficulty:\n  method: {clf.method}\n  calibration: {out}\n  cloud_share: {cloud_share}")


@difficulty.command("recalibrate")
@click.option("--data", required=True, type=click.Path(), help="The labelled JSONL the artefact was fitted on.")
@click.option("--artefact", default=None, type=click.Path(), help="Artefact metadata to update [default: shipped].")
@click.option("--cloud-share", default=0.3, show_default=True, type=click.FloatRange(0, 1))
@click.option("--medium-share", default=0.3, show_default=True, type=click.FloatRange(0, 1))
def recalibrate_cmd(data: str, artefact: str | None, cloud_share: float, medium_share: float) -> None:
    """Re-derive the artefact's shipped thresholds from what serving scores now (the fitted score
    and the everyday cues) on the part it was fitted on (train + validation), without refitting."""
    from gateway.classify.difficulty.artefact import SHIPPED, update_thresholds
    from gateway.classify.difficulty.calibrate import calibrate
    from gateway.classify.difficulty.data import DataError, load_examples, split_indices

    try:
        examples = load_examples(data)
    except DataError as exc:
        _fail(str(exc))
    parts = split_indices(examples)
    fitted = [examples[i] for i in np.concatenate([parts["train"], parts["val"]])]
    bodies = [{"messages": [{"role": "user", "content": e.prompt}]} for e in fitted]
    target = Path(artefact) if artefact else SHIPPED
    for method in ("knn", "heuristic"):
        clf = _build(method, str(target))
        if clf.method != method:
            _fail(f"{method} unavailable: cannot calibrate it")
        result = {**calibrate(score_bodies(clf, bodies), cloud_share, medium_share),
                  "scores": "fitted score + everyday cues, train+validation"}
        update_thresholds(target, method, result)
        click.echo(f"{method}: medium {result['medium']}, hard {result['hard']} ({result['n']} prompts)")


@difficulty.command("eval")
@click.option("--data", required=True, type=click.Path(), help="Labelled JSONL (weak_correct, strong_correct).")
@click.option("--method", type=click.Choice(["knn", "heuristic"]), default="knn", show_default=True)
@click.option("--artefact", default=None, type=click.Path())
@click.option("--split", type=click.Choice(["all", "test", "val", "train"]), default="all", show_default=True,
              help="Evaluate on one part of the grouped split (the shared training file: use test).")
def eval_cmd(data: str, method: str, artefact: str | None, split: str) -> None:
    """ROC AUC for "weak model fails" and the routing curve against random routing."""
    from gateway.classify.difficulty.data import DataError, load_examples, split_indices

    try:
        examples = load_examples(data)
    except DataError as exc:
        _fail(str(exc))
    if split != "all":
        examples = [examples[i] for i in split_indices(examples)[split]]
    clf = _build(method, artefact)
    bodies = [{"messages": [{"role": "user", "content": e.prompt}]} for e in examples]
    scores = score_bodies(clf, bodies)
    for line in eval_report(scores, examples, clf.method):
        click.echo(line)


def eval_report(scores: np.ndarray, examples: list[Any], method: str) -> list[str]:
    from gateway.classify.difficulty.calibrate import routing_curve, share_for_quality
    from gateway.classify.difficulty.train import auc

    weak = np.asarray([e.weak_correct for e in examples], float)
    strong = np.asarray([e.strong_correct for e in examples], float)
    hard = 1 - weak
    lines = [f"method {method}: {len(examples)} prompts, weak acc {weak.mean():.3f}, strong acc {strong.mean():.3f}"]
    if 0 < hard.sum() < len(hard):
        lines.append(f"ROC AUC (weak model fails): {auc(hard, scores):.4f}")
    lines.append("cloud share | accuracy | % of strong | random: accuracy | % of strong")
    for p in routing_curve(scores, weak, strong, SHARES):
        lines.append(f"{p.share:>10.0%} | {p.accuracy:8.4f} | {p.pgr:10.1%} | {p.random_accuracy:16.4f} | {p.random_pgr:10.1%}")
    ours, rnd = share_for_quality(scores, weak, strong, 0.95)
    lines.append(f"cloud share for 95% of strong accuracy: {ours:.1%} (random routing: {rnd:.1%})")
    return lines
