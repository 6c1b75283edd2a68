"""The everyday cues (cues.py), the digits that are not maths (identifiers.py), and what they fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gateway.classify.difficulty.cues import CUES, cue_shift, detect, instruction_of, reasons
from gateway.classify.difficulty.identifiers import mask_identifiers
from gateway.classify.difficulty.signals import extract_text_signals
from tests.difficulty.conftest import body


def names(text: str, turns: int = 1) -> set[str]:
    return {c.name for c in detect(text, turns=turns)}


# ---- identifiers: digits that are not maths


@pytest.mark.parametrize("text", [
    "+1 415-555-0199", "(212) 555-0147", "07700 900123", "+44 20 7946 0958", "8834-2219-AB",
    "INV-2024-00417", "1Z999AA10123456784", "QX7T9P", "2024-07-31", "12/03/2025", "221B Baker Street",
    "NW1 6XE", "CA 94043", "DE89 3704 0044 0532 0130 00", "5567-8890-1123", "version 2.14.3", "room 305",
])
def test_identifiers_are_masked(text: str) -> None:
    masked, count = mask_identifiers(f"see {text} now")
    assert count >= 1 and not any(ch.isdigit() for ch in masked), masked


@pytest.mark.parametrize("text", [
    "3 + 4 = 7", "12 - 5", "x^2 - 7y^2 = 1", "$5,000 at 4%", "at 10:30", "3.5 hours", "1/2 + 1/3",
    "T(n) = 2T(n/2) + n log n", "What is 1234 - 5678?", "[[2,1,0],[1,2,1]]",
])
def test_arithmetic_is_not_masked(text: str) -> None:
    assert mask_identifiers(text) == (text, 0)


def test_a_phone_number_is_not_maths_in_the_signals() -> None:
    s = extract_text_signals("Call me back at +1 415-555-0199 tomorrow.")
    assert s.math == 0 and s.numbers == 0
    assert extract_text_signals("What is 415 - 555?").math == 1  # the same digits as a sum are maths


# ---- cues a user would cite


@pytest.mark.parametrize(("text", "cue"), [
    ("Prove there are infinitely many primes", "asks_for_proof"),
    ("Show that a group of prime order is cyclic.", "asks_for_proof"),
    ("Derive the variance of a binomial distribution.", "asks_for_derivation"),
    ("Compute the eigenvalues of [[2,1],[1,2]].", "advanced_maths"),
    ("Write a Python function that reverses a string.", "asks_for_code"),
    ("Implement Raft leader election in Go with a simulated network and tests.", "large_program"),
    ("Write a complete Flask application with login; about 300 lines.", "large_program"),
    ("Make a weekly workout schedule for a beginner.", "asks_for_plan"),
    ("Compare the two designs and justify your choice.", "asks_for_analysis"),
    ("Assign ICD-10 codes to this discharge summary.", "specialist_domain"),
    ("hi there!", "chit_chat"),
    ("What is the capital of France?", "short_factual"),
    ("What's 2+2?", "short_calculation"),
    ("Fix the grammar: 'me and him goes to the store'", "short_edit"),
    ("Call me back at +1 415-555-0199 tomorrow.", "identifiers_not_maths"),
])
def test_cue_is_detected(text: str, cue: str) -> None:
    assert cue in names(text)


@pytest.mark.parametrize("text", [
    "To borrow the car, Wilson's report card needs to show that he received 80 or more in every subject.",
    "The two basketball teams played on the same court for 48 minutes.",
])
def test_story_words_are_not_cues(text: str) -> None:
    assert not {"asks_for_proof", "specialist_domain"} & names(text)


@pytest.mark.parametrize("text", ["They order 2 meals at $5 each", "The table can seat 4 people"])
def test_quantities_after_a_label_word_stay_maths(text: str) -> None:
    assert mask_identifiers(text) == (text, 0)


def test_constraints_are_counted_in_the_ask_not_in_a_story() -> None:
    ask = ("Plan the launch: give the phases, a rollback plan for each phase, the staffing, the risks, "
           "the budget split, and how we measure success at each milestone, keeping every deadline.")
    story = ("Ava and Emma play a level, and whoever scores most wins. They get 10 points for every enemy, "
             "5 points for each berry, and 30 points for every second left, and Ava is 4 seconds slower, "
             "so what is the difference between their two scores?")
    assert {"several_constraints", "many_constraints"} & names(ask)
    assert not {"several_constraints", "many_constraints"} & names(story)


def test_a_long_document_is_judged_by_its_instruction() -> None:
    doc = "\n\n".join(f"Clause {i}. The Supplier shall deliver the reports on time and keep them accurate." for i in range(30))
    lookup = names("What is the governing law of this agreement?\n\n" + doc)
    analysis = names("Flag every clause that is unfavourable to the Customer and justify each.\n\n" + doc)
    assert instruction_of("Summarise this.\n\n" + doc) == "Summarise this."
    assert {"long_context", "short_lookup"} <= lookup
    assert {"long_context", "asks_for_analysis"} <= analysis and "short_lookup" not in analysis


def test_multi_turn_state_needs_turns() -> None:
    text = "Now give me the full plan, keeping every constraint I gave you."
    assert "multi_turn_state" in names(text, turns=3)
    assert "multi_turn_state" not in names(text, turns=1)
    assert "multi_turn_state" not in names("just saying hi :)", turns=2)


def test_the_word_guards_never_hide_a_match() -> None:
    # each guarded regex runs only when a trigger word is present: on every everyday prompt the
    # guarded answer must be the plain regex's
    from gateway.classify.difficulty import cues
    from tests.difficulty.test_everyday import _body, _rows

    guarded = [g for g in vars(cues).values() if isinstance(g, cues._Guarded)]
    assert len(guarded) >= 6
    for row in _rows():
        text = cues.instruction_of(_body(row)["messages"][-1]["content"])
        vocab = frozenset(cues._LOWER_WORD.findall(text.lower()))
        for g in guarded:
            assert g.search(text, vocab) == (g.regex.search(text) is not None), (row["id"], g.regex.pattern[:40])


def test_reasons_are_words_strongest_first() -> None:
    cues = detect("Prove that √2 is irrational and derive a bound, step by step.")
    assert reasons(cues)[0] == "asks for a proof"
    assert all(isinstance(r, str) and " " in r for r in reasons(cues))
    assert cue_shift("Prove that √2 is irrational") == CUES["asks_for_proof"][1]
    assert cue_shift("What is the capital of France?") < 0 < cue_shift("Prove it.")


# ---- the obvious misses of issue #21, through the shipped classifiers


@pytest.mark.parametrize("method", ["knn", "heuristic"])
def test_the_issues_obvious_misses(method: str, knn_classifier) -> None:
    from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier

    clf = knn_classifier if method == "knn" else build_difficulty_classifier(DifficultyConfig(method="heuristic"))
    phone = clf.classify(body("Call me back at +1 415-555-0199 tomorrow."))
    assert phone.level == "easy", phone
    assert "digits are a phone number, id, date or address, not maths" in phone.evidence["reasons"]
    for proof in ("Prove there are infinitely many primes", "Prove that √2 is irrational"):
        f = clf.classify(body(proof))
        assert f.level == "hard", (proof, f)
        assert f.evidence["reasons"][0] == "asks for a proof"
    assert clf.classify(body("What is the capital of France?")).evidence["reasons"] == ["short factual question"]


def test_a_second_user_turn_is_not_hard_by_itself(knn_classifier) -> None:
    # v2 was fitted on single-turn prompts only: the turns signal's spread was 0, and standardising
    # by it made every multi-turn chat score 1.0 (model.MIN_SIGNAL_SCALE)
    chat = {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "Hi!"},
                         {"role": "user", "content": "just saying hi :)"}]}
    f = knn_classifier.classify(chat)
    assert f.level == "easy" and f.score < 0.5 and "turns" not in f.evidence["contributions"]["signals"]


def test_evidence_without_a_cue_names_what_the_fitted_score_rests_on(knn_classifier) -> None:
    f = knn_classifier.classify(body("Which gas do plants absorb from the air during photosynthesis, and "
                                     "what do they release as a by-product of the process?"))
    assert f.evidence["cues"] == {} and len(f.evidence["reasons"]) == 1
    assert f.evidence["reasons"][0].startswith("resembles ")
    assert "photosynthesis" not in json.dumps(f.evidence)  # words about the prompt, never its text


# ---- calibration follows the combined score


def test_recalibrate_sets_the_shares_of_what_serving_scores(tmp_path, labelled_path) -> None:
    import shutil

    from gateway.classify.difficulty import DifficultyConfig, build_difficulty_classifier
    from gateway.classify.difficulty.artefact import SHIPPED
    from gateway.classify.difficulty_cli import difficulty

    for suffix in (".json", ".npz"):  # the metadata names its arrays file: keep the names
        shutil.copy(SHIPPED.with_suffix(suffix), tmp_path / SHIPPED.with_suffix(suffix).name)
    lines = labelled_path.read_text().splitlines()
    sample = tmp_path / "sample.jsonl"
    sample.write_text("\n".join(lines[i] for i in np.random.default_rng(2).choice(len(lines), 400, replace=False)))
    res = CliRunner().invoke(difficulty, ["recalibrate", "--data", str(sample), "--artefact", str(tmp_path / SHIPPED.name),
                                          "--cloud-share", "0.2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / SHIPPED.name).read_text())
    t = meta["thresholds"]["heuristic"]
    assert t["cloud_share"] == 0.2 and "cues" in t["scores"]
    clf = build_difficulty_classifier(DifficultyConfig(method="heuristic", artefact=str(tmp_path / SHIPPED.name)))
    from gateway.classify.difficulty.data import load_examples, split_indices

    ex = load_examples(sample)
    parts = split_indices(ex)
    fit = [ex[i] for i in np.concatenate([parts["train"], parts["val"]])]
    hard = np.mean([clf.classify(body(e.prompt)).level == "hard" for e in fit])
    assert abs(hard - 0.2) <= 0.02


def test_cues_and_masking_read_a_bounded_prefix(knn_classifier) -> None:
    # a 1 MB prompt full of identifiers: the cues and the masking see only the prefix the signals
    # read, so the finding equals the one for that prefix plus the same tail length
    from gateway.classify.difficulty.signals import SIGNAL_CHARS_MAX, read

    unit = "Call +1 415-555-0199 about order 8834-2219-AB, then prove it.\n\n"
    huge = unit * (20 * SIGNAL_CHARS_MAX // len(unit))
    r = read(body(huge))
    assert len(r.text) == SIGNAL_CHARS_MAX and len(r.embedding_text) <= SIGNAL_CHARS_MAX
    assert r.signals.chars == len(huge)
    assert detect(r.text) == detect(huge[:SIGNAL_CHARS_MAX])
    assert knn_classifier.classify(body(huge)).evidence["reasons"][0] == "asks for a proof"
