"""Card numbers: every issuer range of the table, any grouping, Luhn; near-misses stay text."""

from __future__ import annotations

import random

import pytest

from gateway.classify.sensitivity import PresidioSensitivityClassifier
from gateway.privacy.cards import IIN_RANGES, IinRange, card_specimen, find_cards, luhn_ok, scheme_of
from tests.privacy.bodies import user


def _group(number: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for size in sizes:
        if i < len(number):
            out.append(number[i : i + size])
            i += size
    if i < len(number):
        out.append(number[i:])
    return sep.join(out)


LAYOUTS = [([4, 4, 4, 4, 3], " "), ([4, 4, 4, 4, 3], "-"), ([4, 6, 5, 4], " "), ([6, 13], "-"), ([19], "")]


def _cases() -> list[tuple[str, str]]:
    rng = random.Random(7812)
    out = []
    for n, iin in enumerate(IIN_RANGES):
        for length in sorted({iin.lengths[0], iin.lengths[-1]}):
            number = card_specimen(iin, rng, length)
            sizes, sep = LAYOUTS[(n + length) % len(LAYOUTS)]
            out.append((f"{iin.scheme}-{iin.low}-{length}", _group(number, sizes, sep)))
    return out


CASES = _cases()


def test_specimens_are_in_their_range_and_luhn_valid() -> None:
    rng = random.Random(1)
    for iin in IIN_RANGES:
        for length in iin.lengths:
            number = card_specimen(iin, rng, length)
            assert len(number) == length and luhn_ok(number) and iin.covers(number)
            assert scheme_of(number) is not None


@pytest.mark.parametrize(("name", "written"), CASES, ids=[c[0] for c in CASES])
def test_every_range_is_found_in_any_grouping(
    classifier: PresidioSensitivityClassifier, name: str, written: str
) -> None:
    f = classifier.classify(user(f"Charge {written} for the renewal, thanks."))
    assert [(e.type, e.text) for e in f.entities] == [("CREDIT_CARD", written)], name


@pytest.mark.parametrize("prefix", ["2221", "2230", "2290", "2300", "2599", "2700", "2720"])
def test_mastercard_2_series_end_to_end_of_the_range(classifier: PresidioSensitivityClassifier, prefix: str) -> None:
    number = card_specimen(IinRange("Mastercard", prefix, prefix, (16,)), random.Random(prefix))
    written = _group(number, [4, 4, 4, 4], " ")
    f = classifier.classify(user(f"my Mastercard is {written}"))
    assert [(e.type, e.text) for e in f.entities] == [("CREDIT_CARD", written)]


def test_a_card_inside_a_run_of_other_numbers() -> None:
    number = card_specimen(IIN_RANGES[0], random.Random(3), 16)
    text = f"ref 2024 {_group(number, [4, 4, 4, 4], ' ')} 99"
    assert [text[a:b] for a, b, _ in find_cards(text)] == [_group(number, [4, 4, 4, 4], " ")]


def _failing_luhn(rng: random.Random, first: str, n: int) -> str:
    while True:
        s = first + "".join(rng.choice("0123456789") for _ in range(n - len(first)))
        if not luhn_ok(s):
            return s


@pytest.mark.parametrize(
    "text",
    [
        "Your order number is {order}; it ships on Tuesday.",
        "Tracking 9{rest} is with the courier.",  # Luhn-valid but no scheme starts with 9
        "The big number 4{longer} has twenty digits.",
        "Numbers 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 in a list.",
        "Timestamp 1733312345678 and build 2024-12-04-1733.",
    ],
)
def test_near_misses_are_not_cards(classifier: PresidioSensitivityClassifier, text: str) -> None:
    rng = random.Random(text)
    filled = text.format(
        order=_failing_luhn(rng, "4", 15),
        rest=card_specimen(IinRange("x", "9", "9", (16,)), rng)[1:],
        longer="".join(rng.choice("0123456789") for _ in range(19)),
    )
    f = classifier.classify(user(filled))
    assert "CREDIT_CARD" not in {e.type for e in f.entities}, filled
