"""Overlapping findings resolved by type: a secret's whole span wins, then a card number's.

presidio's other patterns and NER know nothing of credentials: its medical-licence pattern
(two letters and seven digits, no word boundary) matches inside a token, a phone number can
cover part of a card. If such a finding survived next to the secret, the ranking by level and
score that follows could keep the fragment and drop the secret, and half a token would leave.
So before any other ranking, a finding that overlaps a higher-priority one is cut back to what
lies outside it, and only where a space separates the two (an address block running into a
token on the next line keeps its address; a fragment glued to the token goes).
"""

from __future__ import annotations

from collections.abc import Collection

from presidio_analyzer import RecognizerResult


def by_priority(text: str, results: list[RecognizerResult], secrets: Collection[str]) -> list[RecognizerResult]:
    """`results` with every finding overlapping a higher-priority one trimmed or dropped."""

    def rank(r: RecognizerResult) -> int:
        return 2 if r.entity_type in secrets else 1 if r.entity_type == "CREDIT_CARD" else 0

    top = [r for r in results if rank(r) > 0]
    if not top:
        return results
    out: list[RecognizerResult] = []
    for r in results:
        pieces = [(r.start, r.end)]
        for w in top:
            if rank(w) > rank(r):
                pieces = [p for a, b in pieces for p in _outside(text, a, b, w.start, w.end)]
        for a, b in pieces:
            if (a, b) == (r.start, r.end):
                out.append(r)
            else:
                out.append(RecognizerResult(r.entity_type, a, b, r.score, r.analysis_explanation, r.recognition_metadata))
    return out


def _outside(text: str, a: int, b: int, s: int, e: int) -> list[tuple[int, int]]:
    """The parts of [a, b) outside [s, e) that a space separates from it, trimmed."""
    if b <= s or a >= e:
        return [(a, b)]
    out = []
    left = text[a:s] if a < s else ""
    if left[-1:].isspace() and left.strip():
        out.append((a, a + len(left.rstrip())))
    right = text[e:b] if e < b else ""
    if right[:1].isspace() and right.strip():
        out.append((b - len(right.lstrip()), b))
    return out
