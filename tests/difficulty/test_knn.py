"""The knn method with the real MiniLM model and the shipped artefact (built once per session)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gateway.classify.difficulty.data import load_examples, split_indices
from gateway.classify.difficulty.signals import embedding_text, extract_signals, vector
from gateway.classify.difficulty.train import auc
from tests.difficulty.conftest import body

PROMPTS = [
    "What is the capital of France?",
    "Prove that there are infinitely many primes, then give a constructive bound on the n-th prime.",
    "Write a haiku about autumn.",
    "A train leaves at 3pm at 60 mph; another leaves at 4pm at 80 mph. When does the second catch up?",
]


def test_finding_shape_and_evidence(knn_classifier):
    f = knn_classifier.classify(body(PROMPTS[1]))
    assert f.method == "knn"
    assert 0.0 <= f.score <= 1.0
    assert f.level == ("hard" if f.score >= knn_classifier.hard else "medium" if f.score >= knn_classifier.medium else "easy")
    ev = f.evidence
    assert set(ev["contributions"]) == {"intercept", "embedding", "neighbours", "signals"}
    assert len(ev["neighbours"]) == 3 and all(-1.0 <= n["similarity"] <= 1.0 for n in ev["neighbours"])
    assert ev["artefact"] == "difficulty-v2"
    assert "infinitely" not in json.dumps(ev)  # feature names and numbers only, no prompt text


def test_deterministic_across_calls_and_threads(knn_classifier):
    first = [knn_classifier.classify(body(p)) for p in PROMPTS]
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda p: knn_classifier.classify(body(p)), PROMPTS * 3))
    for i, f in enumerate(again):
        assert f == first[i % len(PROMPTS)]  # score, level and evidence alike


def test_batched_scores_match_single_requests(knn_classifier):
    # what eval and calibrate score (score_bodies) is what serving scores (classify), cues included
    bodies = [body(p) for p in PROMPTS] + [
        {"messages": [{"role": "user", "content": "Plan a trip."}, {"role": "assistant", "content": "Where to?"},
                      {"role": "user", "content": "Rome, keeping the budget I gave you earlier."}]},
        body("Call me back at +1 415-555-0199 tomorrow."),
    ]
    batched = knn_classifier.score_bodies(bodies)
    findings = [knn_classifier.classify(b) for b in bodies]
    assert np.allclose(batched, [f.score for f in findings], atol=1e-4)
    # the fitted part alone (score_many) is the artefact's number, shown as evidence
    sigs = np.asarray([vector(extract_signals(b)) for b in bodies], dtype=np.float32)
    fitted = knn_classifier.score_many([embedding_text(b) for b in bodies], sigs)
    assert np.allclose(fitted, [f.evidence["fitted_score"] for f in findings], atol=1e-4)


def test_serving_path_reproduces_the_fit(knn_classifier, labelled_path):
    # On prompts the artefact was fitted on (train + validation parts) the AUC is ~0.73; a broken
    # serving path (other embeddings, signal order, pooling, sign) drops it to ~0.5. Held-out
    # quality is measured by benchmarks/difficulty_eval.py, not here: 120 prompts are too few.
    examples = load_examples(labelled_path)
    parts = split_indices(examples)
    fitted = np.concatenate([parts["train"], parts["val"]])
    pick = [examples[i] for i in np.random.default_rng(0).choice(fitted, 120, replace=False)]
    bodies = [body(e.prompt) for e in pick]
    sigs = np.asarray([vector(extract_signals(b)) for b in bodies], dtype=np.float32)
    scores = knn_classifier.score_many([e.prompt for e in pick], sigs)
    assert auc(np.asarray([e.hard for e in pick]), scores) > 0.65


def test_classifiers_share_one_loaded_model(knn_classifier):
    from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier

    again = build_difficulty_classifier(DifficultyConfig(thresholds={"medium": 0.1, "hard": 0.2}))
    assert again.embedder is knn_classifier.embedder  # a policy reload does not load MiniLM again
    assert (again.medium, again.hard) == (0.1, 0.2)


def test_static_knn_is_fast(knn_classifier, labelled_path):
    # The target is <= 10 ms p50 including embedding; the static embedder takes ~0.5 ms
    # here, so a 10 ms bound is far from flaky even on a loaded machine.
    examples = load_examples(labelled_path)[:60]
    times = []
    for e in examples:
        t = time.perf_counter()
        knn_classifier.classify(body(e.prompt))
        times.append(time.perf_counter() - t)
    assert float(np.median(times)) * 1000 < 10.0


def test_v1_minilm_artefact_serves_through_the_transformer():
    from gateway.classify.difficulty import (
        DifficultyConfig,
        KnnDifficultyClassifier,
        build_difficulty_classifier,
    )
    from gateway.classify.difficulty.artefact import SHIPPED_MINILM

    clf = build_difficulty_classifier(DifficultyConfig(artefact=str(SHIPPED_MINILM)))
    assert isinstance(clf, KnnDifficultyClassifier) and clf.embedder.kind == "minilm"
    f = clf.classify(body(PROMPTS[1]))
    assert f.method == "knn" and f.evidence["artefact"] == "difficulty-v1" and 0.0 <= f.score <= 1.0
    bodies = [body(p) for p in PROMPTS]
    assert np.allclose(clf.score_bodies(bodies), [clf.classify(b).score for b in bodies], atol=1e-4)
