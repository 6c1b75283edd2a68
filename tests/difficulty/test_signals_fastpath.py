"""The fast paths of the signal extractor count exactly what the plain regexes count."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.classify.difficulty.signals import _LETTER, _MATH, _math_count, extract_text_signals

# Texts rich in what the math branches and the letter scan look for.
_ALPHABET = st.sampled_from([*"ab fxz019 +-*/=^$()\\\n.,é中π≤", "\\frac", "f(x)", "x^2", "$a+b$", "3 + 4"])
_TEXTS = st.lists(_ALPHABET, max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(_TEXTS)
def test_math_count_equals_the_full_pattern(text: str) -> None:
    assert _math_count(text) == len(_MATH.findall(text))


@settings(max_examples=200, deadline=None)
@given(_TEXTS)
def test_non_english_share_equals_the_letter_scan(text: str) -> None:
    letters = _LETTER.findall(text)
    expected = round(sum(1 for ch in letters if ord(ch) > 127) / len(letters), 4) if letters else 0.0
    assert extract_text_signals(text).non_english == expected


def test_math_count_sees_each_branch() -> None:
    assert _math_count(r"\frac{1}{2}") == 1
    # $x$, 3 + 4, x^2, f(x), = : one match each
    assert _math_count("$x$ and 3 + 4 and x^2 and f(x) and a = b") == 5
