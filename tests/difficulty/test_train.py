"""`train` end to end on a small sample: a loadable, hashed artefact the knn classifier can use."""

from __future__ import annotations

import json

import numpy as np

from gateway.classify.difficulty import DifficultyConfig, KnnDifficultyClassifier, build_difficulty_classifier
from gateway.classify.difficulty.artefact import load_artefact
from gateway.classify.difficulty.data import load_examples
from gateway.classify.difficulty.train import train
from tests.difficulty.conftest import body


def test_train_writes_a_usable_artefact(knn_classifier, labelled_path, tmp_path):
    lines = labelled_path.read_text().splitlines()
    pick = np.random.default_rng(2).choice(len(lines), 120, replace=False)
    data = tmp_path / "sample.jsonl"
    data.write_text("\n".join(lines[i] for i in sorted(pick)) + "\n")
    out = tmp_path / "art" / "difficulty-v2.json"
    messages: list[str] = []
    meta = train(load_examples(data), data, out, knn_classifier.embedder, cache_dir=None,
                 cloud_share=0.25, echo=messages.append)
    assert any(m.startswith("split: train") for m in messages)
    assert any("grouped-CV AUC" in m for m in messages)  # model selection by grouped CV
    art = load_artefact(out)  # checks the recorded sha256
    assert art.meta["training"]["n_fit"] == meta["training"]["n_fit"] < 120
    assert json.loads(out.read_text())["thresholds"]["knn"]["cloud_share"] == 0.25
    assert art.meta["embedding"]["kind"] == "static" and art.version == "difficulty-v2"
    clf = build_difficulty_classifier(DifficultyConfig(artefact=str(out)))
    assert isinstance(clf, KnnDifficultyClassifier)
    f = clf.classify(body("Differentiate x^3 sin(x) and explain each step."))
    assert f.method == "knn" and 0.0 <= f.score <= 1.0


def test_grouped_cv_does_not_reward_memorising_subjects():
    # Each group (subject) has its own embedding direction and its own failure rate: a model can
    # memorise "this subject is hard" but that says nothing about an unseen subject. A signal that
    # really predicts failure inside every group must carry over. Grouped CV must tell them apart.
    from gateway.classify.difficulty.train import Hyper, grouped_cv_auc

    rng = np.random.default_rng(0)
    n_groups, per = 24, 30
    groups = np.repeat([f"g{i}" for i in range(n_groups)], per)
    centres = rng.normal(size=(n_groups, 16))
    emb = np.repeat(centres, per, axis=0) + 0.05 * rng.normal(size=(n_groups * per, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    group_rate = np.repeat(rng.uniform(0.1, 0.9, n_groups), per)
    memorised = (rng.uniform(size=len(groups)) < group_rate).astype(int)
    noise = rng.normal(size=(len(groups), 12)).astype(np.float32)
    h = [Hyper(prototypes=16, k=3, temp=0.05, c=10.0, neighbours=True)]
    assert abs(grouped_cv_auc(emb, noise, memorised, groups, h, folds=6)[0] - 0.5) < 0.1

    transferable = (rng.uniform(size=len(groups)) < 0.5).astype(int)
    sig = noise.copy()
    sig[:, 0] += 2.0 * transferable  # one heuristic signal that separates hard from easy everywhere
    assert grouped_cv_auc(emb, sig, transferable, groups, h, folds=6)[0] > 0.8


def test_prototype_topic_ties_do_not_depend_on_hash_order():
    from gateway.classify.difficulty.train import prototype_labels

    labels = np.asarray([0, 0, 0, 0, 1])
    sources = ["mmlu:virology", "mmlu:anatomy", "mmlu:virology", "mmlu:anatomy", "gsm8k"]
    assert prototype_labels(labels, sources, 3) == ["mmlu:anatomy", "gsm8k", ""]
