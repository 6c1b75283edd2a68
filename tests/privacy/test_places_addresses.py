"""Address blocks, places, NER label corrections, short phones and 15-digit cards, through the
real presidio analyzer (custom_classifier: patterns only; classifier: with spaCy NER)."""

from __future__ import annotations

import pytest

from gateway.classify.sensitivity import PresidioSensitivityClassifier, build_sensitivity_classifier
from gateway.features import SensitivityFinding
from gateway.privacy.config import PrivacyConfig
from tests.privacy.bodies import user


def found(finding: SensitivityFinding) -> set[tuple[str, str]]:
    return {(e.type, e.text) for e in finding.entities}


ADDRESSES = [
    # the whole block, not just the street line: unit, town, region, postcode and country too
    (
        "Ship to 1600 Pennsylvania Avenue NW, Washington, DC 20500 today",
        "1600 Pennsylvania Avenue NW, Washington, DC 20500",
    ),
    ("My address is Olmstraat 69\n Apt. 12\n Echt\n Netherlands", "Olmstraat 69\n Apt. 12\n Echt\n Netherlands"),
    ("Write to Via Roma 12, 00184 Roma, Italia.", "Via Roma 12, 00184 Roma, Italia"),
    ("mail: PSC 3412, Box 5242\nAPO AE 67601", "PSC 3412, Box 5242\nAPO AE 67601"),
    ("It is 744 15 Millicent Drive Suite 313\nSPRINGDALE HEIGHTS\n, NSW\n 41860", None),
    ("The office is at 23 Rue Abderrahmen Ziad Suite 658 Tebaga Tunisia", None),
    ("He lives on the north side of Hauger Skolevei 90.", "Hauger Skolevei 90"),
    ("Send it to Λεωφόρος Κηφισίας 120, Athens", "Λεωφόρος Κηφισίας 120, Athens"),
]


@pytest.mark.parametrize(("text", "address"), ADDRESSES)
def test_address_blocks(custom_classifier: PresidioSensitivityClassifier, text: str, address: str | None) -> None:
    f = custom_classifier.classify(user(text))
    addresses = [e.text for e in f.entities if e.type == "STREET_ADDRESS"]
    if address is None:  # the block runs to the end of the text
        address = text[text.index(next(c for c in text if c.isdigit())) :]
    assert addresses == [address]


def test_address_ends_before_the_next_sentence_and_the_phone_line(
    custom_classifier: PresidioSensitivityClassifier,
) -> None:
    f = custom_classifier.classify(user("We meet at 10 Downing Street. John Smith will attend."))
    assert [e.text for e in f.entities if e.type == "STREET_ADDRESS"] == ["10 Downing Street."]
    card = "Maren H\n\n271 Rue du Pont 172\n Apt. 910\n Anvaing\n Belgium 34866\n0494 41 18 24-Office"
    got = found(custom_classifier.classify(user(card)))
    assert ("STREET_ADDRESS", "271 Rue du Pont 172\n Apt. 910\n Anvaing\n Belgium 34866") in got
    assert ("PHONE_NUMBER", "0494 41 18 24") in got


@pytest.mark.parametrize(
    "text",
    [
        "I use Windows 10 and Python 3.11; see chapter 5, table 12.",
        "Top 5 Musicians Of The 70s You Should Know",
        "See Table 3 Row 5 and Figure 2 Panel 4.",
        "Version 2 Release 3 ships on 12 March 2024.",
        "We sold 300 Units in 2021 and 20 Million phones.",
        "Open the file at line 42 Column 7",
        "Fixed in issue #42; see Block 5 of the model and Room 101",
        "The meeting is on Monday 12 and the show is on Channel 4",
        "Logged at 2010-12-14 20:49:32.845598 by cron",
        "turkey and china plates are on sale",
        "Analysis took 40 ms CPU and 12 ms Wall time",  # milliseconds, not Ms. Cpu
    ],
)
def test_ordinary_text_is_not_flagged(custom_classifier: PresidioSensitivityClassifier, text: str) -> None:
    assert not custom_classifier.classify(user(text)).entities


@pytest.mark.parametrize(
    ("text", "place"),
    [
        ("We flew to Norway last week.", "Norway"),
        ("Shipping from the UNITED KINGDOM takes a day", "UNITED KINGDOM"),
        ("I'm in Þorlákshöfn, at the conference", "Þorlákshöfn"),  # no NER here: the cue alone
        ("We moved here from Sidi El Heni", "Sidi El Heni"),
    ],
)
def test_places_by_gazetteer_and_cue(custom_classifier: PresidioSensitivityClassifier, text: str, place: str) -> None:
    assert found(custom_classifier.classify(user(text))) == {("LOCATION", place)}


def test_ner_label_corrections(classifier: PresidioSensitivityClassifier) -> None:
    # en_core_web_sm tags these names ORG (ignored by presidio, so they would leak)...
    for text, name in [
        ("I want to add Terence Vassiliev as a beneficiary to my account", "Terence Vassiliev"),
        ("Johannes Møller will be talking in the conference", "Johannes Møller"),
        ("She named him Amadeo", "Amadeo"),
    ]:
        assert ("PERSON", name) in found(classifier.classify(user(text))), text
    # ...and this town PERSON; a cue before it says it is a place.
    assert found(classifier.classify(user("The Princess Royal arrived at Þorlákshöfn this morning"))) == {
        ("LOCATION", "Þorlákshöfn")
    }
    # Organisations and capitalised nouns stay unflagged.
    assert not classifier.classify(user("Kosmos Energy Ltd reported results")).entities
    assert not {e.type for e in classifier.classify(user("Wisdom is a virtue, said the Devil.")).entities} & {"PERSON"}


def test_person_does_not_swallow_the_unit_line(classifier: PresidioSensitivityClassifier) -> None:
    text = "Erin Rukavina Suite 241 77 Main Street\nSpringfield IL 62704"
    assert found(classifier.classify(user(text))) == {
        ("PERSON", "Erin Rukavina"),
        ("STREET_ADDRESS", "Suite 241 77 Main Street\nSpringfield IL 62704"),
    }


def test_short_local_phone_needs_a_context_word(custom_classifier: PresidioSensitivityClassifier) -> None:
    # "call" is a spaCy stop word; presidio would drop it from the context, we keep it.
    assert ("PHONE_NUMBER", "61 60 34") in found(custom_classifier.classify(user("You can call 61 60 34")))
    assert not custom_classifier.classify(user("The score was 61 60 34 in the last three rounds")).entities


def test_fifteen_digit_jcb_card(custom_classifier: PresidioSensitivityClassifier) -> None:
    got = found(custom_classifier.classify(user("card 213128569146303 expired")))
    assert got == {("CREDIT_CARD", "213128569146303")}


def test_nationalities(custom_classifier: PresidioSensitivityClassifier) -> None:
    got = found(custom_classifier.classify(user("Our Norwegian hosts met the latvians downtown")))
    assert got == {("NRP", "Norwegian"), ("NRP", "latvians")}
    assert not custom_classifier.classify(user("french fries with a side of swiss cheese")).entities


def test_possessive_and_company_suffix_are_trimmed(classifier: PresidioSensitivityClassifier) -> None:
    got = found(classifier.classify(user("They were singing verses from Maite Lemmens's Cautionary Tales.")))
    assert ("PERSON", "Maite Lemmens") in got
    assert not {t for t, v in got if v.endswith("'s")}


def test_no_ner_when_the_policy_grades_none_of_its_entities() -> None:
    cfg = PrivacyConfig(levels={"PERSON": "none", "LOCATION": "none", "NRP": "none"})
    c = build_sensitivity_classifier(cfg)
    assert isinstance(c, PresidioSensitivityClassifier)
    assert c.ner_pipeline().pipe_names == []  # a blank tokenizer: NER is never run
    f = c.classify(user("Jane Doe from Paris wrote from jane@example.com"))
    assert {e.type for e in f.entities} == {"EMAIL_ADDRESS"}


def test_default_pipeline_runs_ner_alone(classifier: PresidioSensitivityClassifier) -> None:
    # The shared tok2vec only feeds the tagger/parser we exclude; NER carries its own.
    assert classifier.ner_pipeline().pipe_names == ["ner"]


def test_place_cue_wins_over_a_person_reading(classifier: PresidioSensitivityClassifier) -> None:
    # spaCy-small tags the town ORG or PERSON; "moved here from" says it is a place.
    got = found(classifier.classify(user("We moved here from Gibraleón")))
    assert got == {("LOCATION", "Gibraleón")}
