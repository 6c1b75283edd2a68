"""`difficulty calibrate` and `difficulty eval` through click, on real sample files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gateway.classify.difficulty_cli import difficulty


@pytest.fixture(scope="module")
def sample(tmp_path_factory, labelled_path):
    lines = labelled_path.read_text().splitlines()
    pick = np.random.default_rng(1).choice(len(lines), 120, replace=False)
    path = tmp_path_factory.mktemp("data") / "sample.jsonl"
    path.write_text("\n".join(lines[i] for i in sorted(pick)) + "\n")
    return path


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_calibrate_gives_requested_hard_share(sample, tmp_path, share):
    out = tmp_path / "difficulty.json"
    res = CliRunner().invoke(difficulty, ["calibrate", "--data", str(sample), "--cloud-share", str(share),
                                          "--method", "heuristic", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cal = json.loads(out.read_text())
    assert cal["method"] == "heuristic" and cal["n"] == 120
    assert abs(cal["hard_share_observed"] - share) <= 0.02
    assert cal["medium"] <= cal["hard"]
    assert "thresholds: {medium:" in res.output


def test_calibrated_thresholds_reproduce_the_share_through_the_classifier(sample, tmp_path):
    from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier

    out = tmp_path / "difficulty.json"
    CliRunner().invoke(difficulty, ["calibrate", "--data", str(sample), "--cloud-share", "0.25",
                                    "--method", "heuristic", "--out", str(out)])
    cal = json.loads(out.read_text())
    clf = build_difficulty_classifier(DifficultyConfig(
        method="heuristic", thresholds={"medium": cal["medium"], "hard": cal["hard"]}))
    prompts = [json.loads(line)["prompt"] for line in sample.read_text().splitlines()]
    levels = [clf.classify({"messages": [{"role": "user", "content": p}]}).level for p in prompts]
    assert abs(levels.count("hard") / len(levels) - 0.25) <= 0.02


def test_eval_prints_auc_and_routing_curve(sample):
    res = CliRunner().invoke(difficulty, ["eval", "--data", str(sample), "--method", "heuristic"])
    assert res.exit_code == 0, res.output
    assert "ROC AUC" in res.output
    assert res.output.count("%") >= 18  # nine shares, router and random
    assert "cloud share for 95% of strong accuracy" in res.output


def test_bad_data_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "weak_correct": true, "strong_correct": true}\nnot json\n')
    res = CliRunner().invoke(difficulty, ["calibrate", "--data", str(bad), "--cloud-share", "0.3",
                                          "--method", "heuristic", "--out", str(tmp_path / "o.json")])
    assert res.exit_code == 2
    assert "bad.jsonl:2" in res.output


def test_knn_eval_and_calibrate_run_on_the_shipped_artefact(sample, tmp_path):
    res = CliRunner().invoke(difficulty, ["eval", "--data", str(sample), "--method", "knn"])
    assert res.exit_code == 0, res.output
    assert "method knn: 120 prompts" in res.output and "ROC AUC" in res.output
    out = tmp_path / "difficulty.json"
    res = CliRunner().invoke(difficulty, ["calibrate", "--data", str(sample), "--cloud-share", "0.2",
                                          "--method", "knn", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cal = json.loads(out.read_text())
    assert cal["method"] == "knn" and abs(cal["hard_share_observed"] - 0.2) <= 0.02
