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
    out = tmp_path / "art" / "difficulty-v1.json"
    messages: list[str] = []
    meta = train(load_examples(data), data, out, knn_classifier.embedder, cache_dir=None,
                 cloud_share=0.25, echo=messages.append)
    assert any(m.startswith("split: train") for m in messages)
    art = load_artefact(out)  # checks the recorded sha256
    assert art.meta["training"]["n_fit"] == meta["training"]["n_fit"] < 120
    assert json.loads(out.read_text())["thresholds"]["knn"]["cloud_share"] == 0.25
    clf = build_difficulty_classifier(DifficultyConfig(artefact=str(out)))
    assert isinstance(clf, KnnDifficultyClassifier)
    f = clf.classify(body("Differentiate x^3 sin(x) and explain each step."))
    assert f.method == "knn" and 0.0 <= f.score <= 1.0
