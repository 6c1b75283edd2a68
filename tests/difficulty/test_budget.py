"""Issue #21, "calibrated to a budget": `difficulty.cloud_share` in a policy makes that share of
traffic score `hard`, with thresholds from a calibration's recorded score distribution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier
from gateway.classify.difficulty.artefact import SHIPPED, SHIPPED_MINILM, load_artefact
from gateway.classify.difficulty.calibrate import NEVER, score_quantiles, thresholds_for_share
from gateway.classify.difficulty.data import load_examples, split_indices
from gateway.classify.difficulty_cli import difficulty, score_bodies
from gateway.policy.load import PolicyError, load_policy
from tests.difficulty.conftest import policy_with


def _bodies(prompts: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p}]} for p in prompts]


def _hard_share(clf, prompts: list[str]) -> float:
    levels = [clf.classify(b).level for b in _bodies(prompts)]
    return levels.count("hard") / len(levels)


@pytest.fixture(scope="module")
def fitted_prompts(labelled_path) -> list[str]:
    """The part the shipped artefact was calibrated on (train + validation), all 7,981 prompts."""
    examples = load_examples(labelled_path)
    parts = split_indices(examples)
    return [examples[i].prompt for i in sorted(np.concatenate([parts["train"], parts["val"]]))]


@pytest.fixture(scope="module")
def fitted_scores(knn_classifier, fitted_prompts) -> np.ndarray:
    """What serving scores for each (score_bodies == classify's score: test_knn checks it)."""
    return score_bodies(knn_classifier, _bodies(fitted_prompts))


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, labelled_path) -> Path:
    """A 'your traffic' file: 300 prompts from the held-out test part, written as calibrate reads it."""
    examples = load_examples(labelled_path)
    test = split_indices(examples)["test"]
    pick = np.random.default_rng(3).choice(test, 300, replace=False)
    path = tmp_path_factory.mktemp("traffic") / "traffic.jsonl"
    path.write_text("".join(json.dumps({"prompt": examples[i].prompt}) + "\n" for i in sorted(pick)))
    return path


def test_thresholds_for_share_cut_the_distribution_where_asked():
    scores = np.random.default_rng(0).beta(2, 5, 20_000)
    q = score_quantiles(scores)
    assert len(q) == 201 and q == sorted(q)
    for share in (0.05, 0.2, 0.5, 0.9):
        medium, hard = thresholds_for_share(q, share, 0.3)
        assert abs((scores >= hard).mean() - share) < 0.01
        assert abs((scores >= medium).mean() - min(1.0, share + 0.3)) < 0.01
    assert thresholds_for_share(q, 0.0, 0.0) == (NEVER, NEVER)  # nothing reaches a score above 1
    medium, hard = thresholds_for_share(q, 1.0, 0.3)
    assert medium == hard == q[0]


def test_shipped_artefact_records_the_distribution_its_thresholds_came_from():
    art = load_artefact()
    for method in ("knn", "heuristic"):
        cal = art.calibration(method)
        assert cal is not None and cal.quantiles is not None and len(cal.quantiles) == 201
        # its own shares (30% hard, 30% medium) read back from the distribution: the same cuts
        medium, hard = cal.thresholds(0.3, 0.3)
        assert abs(hard - cal.hard) < 0.01 and abs(medium - cal.medium) < 0.01


@pytest.mark.parametrize("share", [0.1, 0.2, 0.45])
def test_policy_cloud_share_sets_the_hard_share_of_the_artefacts_prompts(tmp_path, fitted_prompts,
                                                                         fitted_scores, share):
    policy = load_policy(policy_with(tmp_path, {"method": "knn", "cloud_share": share}))
    clf = build_difficulty_classifier(policy.difficulty)
    assert clf.method == "knn"
    assert abs((fitted_scores >= clf.hard).mean() - share) <= 0.01
    assert abs((fitted_scores >= clf.medium).mean() - (share + 0.3)) <= 0.01
    # and through classify() itself, on a sample (sampling error: ~0.03 at 400 prompts)
    assert abs(_hard_share(clf, fitted_prompts[::20]) - share) <= 0.08


def test_cloud_share_zero_sends_nothing_hard_and_one_everything(tmp_path, fitted_prompts):
    none = build_difficulty_classifier(load_policy(policy_with(tmp_path, {"cloud_share": 0.0})).difficulty)
    assert _hard_share(none, fitted_prompts[:100]) == 0.0
    every = build_difficulty_classifier(load_policy(policy_with(tmp_path, {"cloud_share": 1.0})).difficulty)
    assert _hard_share(every, fitted_prompts[:100]) == 1.0


def test_budget_from_a_calibration_of_your_own_traffic(tmp_path, traffic):
    """calibrate once on your traffic at 30%; the policy can then ask for 15% without rescoring."""
    cal_path = tmp_path / "difficulty.json"
    res = CliRunner().invoke(difficulty, ["calibrate", "--data", str(traffic), "--cloud-share", "0.3",
                                          "--out", str(cal_path)])
    assert res.exit_code == 0, res.output
    cal = json.loads(cal_path.read_text())
    assert cal["method"] == "knn" and len(cal["quantiles"]) == 201

    prompts = [json.loads(line)["prompt"] for line in traffic.read_text().splitlines()]
    as_calibrated = build_difficulty_classifier(
        load_policy(policy_with(tmp_path, {"calibration": str(cal_path)})).difficulty)
    assert (as_calibrated.medium, as_calibrated.hard) == (cal["medium"], cal["hard"])
    assert abs(_hard_share(as_calibrated, prompts) - 0.3) <= 0.02

    budget = build_difficulty_classifier(
        load_policy(policy_with(tmp_path, {"calibration": str(cal_path), "cloud_share": 0.15})).difficulty)
    assert abs(_hard_share(budget, prompts) - 0.15) <= 0.02
    # the same scores the CLI calibrated: serving and calibration agree on every prompt
    scores = score_bodies(budget, _bodies(prompts))
    assert abs((scores >= budget.hard).mean() - 0.15) <= 0.02


def test_knn_falling_back_to_heuristic_uses_the_heuristic_distribution():
    """knn scores and heuristic scores differ: a knn that degrades takes the heuristic's quantiles."""
    cfg = DifficultyConfig(method="knn", embedding_package="no_such_embedding_package", cloud_share=0.2)
    clf = build_difficulty_classifier(cfg)
    assert clf.method == "heuristic"
    heur = load_artefact().calibration("heuristic")
    assert heur is not None
    assert (clf.medium, clf.hard) == heur.thresholds(0.2, 0.3)


def test_no_calibration_at_all_is_logged_as_an_error(tmp_path):
    art_dir = tmp_path / "art"
    art_dir.mkdir()
    shutil.copy(SHIPPED, art_dir / SHIPPED.name)  # metadata without its arrays: the artefact is refused
    with capture_logs() as logs:
        clf = build_difficulty_classifier(DifficultyConfig(artefact=str(art_dir / SHIPPED.name), cloud_share=0.2))
    assert clf.method == "heuristic"
    [event] = [e for e in logs if e["event"] == "difficulty_budget_uncalibrated"]
    assert event["log_level"] == "error" and event["cloud_share"] == 0.2


@pytest.mark.parametrize(("section", "words"), [
    ({"thresholds": {"medium": 0.2, "hard": 0.6}, "cloud_share": 0.2}, "not both"),
    ({"cloud_share": 1.5}, "cloud_share"),
    ({"calibration": "/nonexistent/difficulty.json"}, "unreadable difficulty calibration"),
    ({"cloud_share": 0.2, "artefact": str(SHIPPED_MINILM)}, "records no score distribution"),
])
def test_a_budget_that_cannot_be_honoured_is_a_policy_error(tmp_path, section, words):
    with pytest.raises(PolicyError, match="difficulty") as err:
        load_policy(policy_with(tmp_path, section))
    assert words in str(err.value)


def test_calibration_for_another_method_is_a_policy_error(tmp_path, traffic):
    cal_path = tmp_path / "heuristic.json"
    res = CliRunner().invoke(difficulty, ["calibrate", "--data", str(traffic), "--cloud-share", "0.3",
                                          "--method", "heuristic", "--out", str(cal_path)])
    assert res.exit_code == 0, res.output
    with pytest.raises(PolicyError, match="calibrates method 'heuristic'"):
        load_policy(policy_with(tmp_path, {"method": "knn", "calibration": str(cal_path), "cloud_share": 0.1}))
    old = {k: v for k, v in json.loads(cal_path.read_text()).items() if k != "quantiles"}
    cal_path.write_text(json.dumps(old))  # written before calibrations kept their distribution
    with pytest.raises(PolicyError, match="re-run `hybrid-gateway difficulty calibrate`"):
        load_policy(policy_with(tmp_path, {"method": "heuristic", "calibration": str(cal_path), "cloud_share": 0.1}))
