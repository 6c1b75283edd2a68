"""Technology names, opening imperatives and languages are not personal data; real names still are."""

from __future__ import annotations

import pytest

from gateway.classify.sensitivity import PresidioSensitivityClassifier


def found(classifier: PresidioSensitivityClassifier, text: str) -> set[tuple[str, str]]:
    f = classifier.classify({"messages": [{"role": "user", "content": text}]})
    return {(e.type, text[e.start : e.end]) for e in f.entities}


@pytest.mark.parametrize(
    "text",
    [
        "Convert this JSON to YAML and explain the REST API.",
        "Is Kubernetes better than Docker Swarm for small teams?",
        "Explain how React hooks work, with an example using useEffect.",
        "Refactor the FastAPI endpoint to use Pydantic models.",
        "Translate this paragraph into English, then into French.",
        "Which is harder to learn: Spanish or German?",
        "I speak English and Portuguese fluently.",
    ],
)
def test_no_personal_data_in_technical_and_language_prompts(classifier: PresidioSensitivityClassifier,
                                                            text: str) -> None:
    assert found(classifier, text) == set()


def test_people_places_and_peoples_are_still_found(classifier: PresidioSensitivityClassifier) -> None:
    got = found(classifier, "My colleague Priya Nair is Indian and lives in Pune. Mark Spencer fixed the Django app.")
    assert {("PERSON", "Priya Nair"), ("NRP", "Indian"), ("LOCATION", "Pune"), ("PERSON", "Mark Spencer")} <= got
    # A nationality that is not named as a language stays a nationality.
    assert ("NRP", "French") in found(classifier, "The French delegation met in Geneva.")
