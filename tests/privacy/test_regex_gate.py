"""A gated pattern finds exactly what the pattern finds over the whole text, and gates are proven, never guessed."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from presidio_analyzer import PatternRecognizer

from gateway.classify.sensitivity import PresidioSensitivityClassifier
from gateway.privacy import cards, recognizers
from gateway.privacy.regex_gate import GatedRegex, find_gate, gate, windows
from tests.routing_data import LABELLED_PROMPTS

ROUTING = LABELLED_PROMPTS
FLAGS = regex.DOTALL | regex.MULTILINE | regex.IGNORECASE  # presidio's

# One or more of each shape the gated patterns look for, and near misses.
SAMPLES = [
    "https://www.example.com/a/b?c=1#frag", "http://10.0.0.1:8080/x", "example.co.uk", "www2.test-site.org",
    '"https://quoted.example.net"', "'docs.python.org/3/'", "e.g.", "i.e.", "v1.2.3", "3.14159", "a.b.c",
    "192.168.10.24", "10.0.0.256", "::1", "::", "2001:db8::8a2e:370:7334", "fe80::1%eth0", "::ffff:192.0.2.128",
    "64:ff9b::192.0.2.33", "00:1A:2B:3C:4D:5E", "001a.2b3c.4d5e", "01-23-45-67-89-ab",
    "123e4567-e89b-12d3-a456-426614174000", "536-22-1234", "536 22 1234", "536221234", "078-05-1120",
    "912-70-1234", "912 70 1234", "A1234567", "AB123456", "H12345678", "123456789", "1234567890123456",
    "4111 1111 1111 1111", "4111-1111-1111-1111", "5500005555555559", "378282246310005",
    "GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "1BoatSLRHtKNngkdXEeobR76b53LETtpyT",
    "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq", "2024-03-15", "15/03/2024", "03/15/24", "15.03.2024",
    "2024/03/15", "15-Mar-2024", "Mar-2024", "15-Mar", "3/2024", "03/24", "2024-03-15T10:20:30.5+02:00",
    "+1 (415) 555-2671", "+44 20 7946 0958", "(212) 555-0100", "415.555.2671", "0049 30 901820", "555-0100 x12",
    "61 60 34", "AB1234567", "BB1234563", "F1234567", "1234", "12", "7", "ref 00000123",
    "margaret.thornton@example.org", "a@b.co", "user:pass@host", "#123", "C:/x/y", "a/b", "+-+", "_x_",
]
SEPARATORS = [" ", "  ", "\n", "\t", ", ", ". ", "(", ")", ": ", "\u00a0", "\u2003", "", "-", "/", ".", "x", "'"]


def _pii_texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(SAMPLES) if rng.random() < 0.6 else rng.choice(["word", "Team", "a", "of"]))
            parts.append(rng.choice(SEPARATORS))
        out.append("".join(parts))
    return out


def _prompts(n: int) -> list[str]:
    lines = ROUTING.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"][:2000] for line in lines[:: max(1, len(lines) // n)][:n]]


def _gated_patterns(classifier: PresidioSensitivityClassifier) -> list[tuple[str, GatedRegex]]:
    out = []
    for rec in classifier._analyzer.registry.recognizers:
        if isinstance(rec, PatternRecognizer):
            for p in rec.patterns:
                if isinstance(p.compiled_regex, GatedRegex):
                    out.append((f"{rec.name}/{p.name}", p.compiled_regex))
    for name, rx in (("_PHONE_CANDIDATE", recognizers._PHONE_CANDIDATE), ("CARD_RUN", cards.CARD_RUN)):
        assert isinstance(rx, GatedRegex), name
        out.append((name, rx))
    return out


def _spans(rx: Any, text: str) -> list[tuple[int, int, tuple[Any, ...]]]:
    return [(*m.span(), m.groups()) for m in rx.finditer(text)]


@pytest.fixture(scope="module")
def gated(classifier: PresidioSensitivityClassifier) -> list[tuple[str, GatedRegex]]:
    return _gated_patterns(classifier)


def test_most_patterns_are_gated(classifier: PresidioSensitivityClassifier, gated: list[tuple[str, GatedRegex]]) -> None:
    names = {n.split("/")[0] for n, _ in gated}
    assert {"UrlRecognizer", "IpRecognizer", "UsLicenseRecognizer", "DateRecognizer", "UsSsnRecognizer"} <= names
    assert len(gated) >= 35


def test_same_matches_on_pii_dense_and_real_texts(gated: list[tuple[str, GatedRegex]]) -> None:
    texts = _pii_texts(600) + _prompts(150)
    hits = 0
    for name, rx in gated:
        for text in texts:
            want = _spans(rx.compiled, text)
            assert _spans(rx, text) == want, (name, text)
            hits += len(want)
    assert hits > 2000  # the texts do exercise the patterns


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="0123456789 .:-/@+_#\n\tabcefxAFXZ()'\"\u00a0\u2003\u0663", max_size=80))
def test_same_matches_on_generated_texts(gated: list[tuple[str, GatedRegex]], text: str) -> None:
    for name, rx in gated:
        assert _spans(rx, text) == _spans(rx.compiled, text), name


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"\b\d{3}-\d{2}-\d{4}\b", ("digit", True)),
        (r"\d{1,3} \d{1,3}", ("digit", False)),  # may hold a space, but at most 7 characters long
        (r"https?://\S+", (":", True)),
        (r"[a-z]+[.](?:com|org)", (".", True)),
        (r"\d[.]\d|@", None),  # one alternative has no digit, the other no dot: nothing is required
        (r"\d+ \d+", None),  # holds spaces and is unbounded: no window can be proven
        (r"x?\d*", None),  # may match without a digit (even empty)
        (r"(?=.*)\d", None),  # an unbounded look-ahead
        (r"a.b", None),  # '.' is any character: no literal dot is required
        (r"(\d)\1", ("digit", False)),  # a back-reference is not analysed: bounded width only
    ],
)
def test_gates_are_proven_from_the_syntax(pattern: str, expected: tuple[str, bool] | None) -> None:
    g = find_gate(pattern, FLAGS)
    assert (None if g is None else (g.char, g.chunked)) == expected


def test_patterns_outside_the_proof_are_left_alone() -> None:
    assert find_gate(r"\p{L}+\d", FLAGS) is None  # syntax only `regex` knows
    assert find_gate(r"\d{3}", FLAGS | regex.FULLCASE | regex.VERSION1) is None  # full case folding
    rx = re.compile(r"\w+")
    assert gate(rx) is rx


def test_a_sentence_full_stop_opens_no_url_window() -> None:
    g = find_gate(r"[a-z0-9.\-]{1,253}[.](?:com|org)", FLAGS)
    assert g is not None and g.followed
    text = "Please list the actions. Then email the team. See example.com for more."
    assert [text[a:b].strip() for a, b in windows(text, g)] == ["example.com"]


def test_look_arounds_read_past_the_window_core() -> None:
    # The look-ahead reads across the space after the chunk: the window must include it.
    rx = gate(regex.compile(r"\b\d{2}(?!\sx)(?<!y\s\d\d)", FLAGS))
    assert isinstance(rx, GatedRegex) and rx.gate.chunked and rx.gate.margin >= 3
    for text in ["12 x", "12  x", "y 12", "12 z", "a 12 b 34 x", "y 12 x 56"]:
        assert _spans(rx, text) == _spans(rx.compiled, text), text
