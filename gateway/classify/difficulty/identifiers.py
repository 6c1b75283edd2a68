"""Digits that are not maths: phone numbers, ids and codes, dates, postcodes, street numbers, versions.

"Call me back at +1 415-555-0199" is not an arithmetic problem, but `415-555` looks like a
subtraction and the digits count as numbers. The difficulty signals are read with these spans
blanked out. Money, plain times and quantities are left alone: in a word problem they are the maths.
"""

from __future__ import annotations

import re

# Each alternative must not match ordinary arithmetic ("3 + 4", "12 - 5", "x^2 = 16", "10:30",
# "$5,000", "3.5 hours"): phone and id patterns need more digits, or letters mixed with digits.
# Grouped by the character a match starts with, each group behind a one-character lookahead: re
# tries every alternative at every position otherwise (0.45 ms per KB of prose, now ~0.1 ms).
_STARTS_WITH_DIGIT = (
    # phone numbers: +CC prefix, (212) 555-0147, 415-555-0199, 07700 900123 (7+ digits in groups)
    r"\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]\d{2,4}){1,4}",
    r"\(\d{2,4}\)\s?\d{3,4}[\s.-]\d{3,4}",
    r"(?<![\w.])\d{3,5}[\s.-]\d{3,4}[\s.-]\d{3,4}(?![\w.])",
    r"(?<![\w.])0\d{3,4}\s\d{5,7}(?![\w.])",
    # dates: 2024-07-31, 12/03/2025, 03/14 (a fraction such as 1/2 has no leading zero or year)
    r"(?<![\w.])\d{4}-\d{2}-\d{2}(?![\w.])",
    r"(?<![\w./])\d{1,2}/\d{1,2}/\d{2,4}(?![\w./])",
    r"(?<![\w./])0\d/\d{2}(?![\w./])",
    # account and tracking numbers: long digit runs, 5567-8890-1123
    r"(?<![\w.])\d{4}-\d{4}-\d{4}(?:-\d{4})?(?![\w.])",
    r"(?<![\w.,])\d{9,}(?![\w.,])",
    # street numbers: "221B Baker Street", "18 Rue de Rivoli", "1600 Amphitheatre Parkway"
    r"\b\d{1,5}[A-Z]?\s+(?:[A-Z][a-z]+\s+){0,3}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Way|Parkway|Drive|"
    r"Boulevard|Blvd|Place|Square)\b",
    r"\b\d{1,5}\s+(?:Rue|Via|Calle|Avenida)\b",
    # version numbers: 2.14.3
    r"(?<![\w.])\d+\.\d+\.\d+(?:\.\d+)*(?![\w.])",
)
_STARTS_WITH_CAPITAL = (
    # IBAN-style: DE89 3704 0044 0532 0130 00
    r"\b[A-Z]{2}\d{2}(?:\s?[0-9A-Z]{4}){3,7}(?:\s?[0-9A-Z]{1,3})?\b",
    # postcodes: UK "NW1 6XE", a US ZIP after a state code "CA 94043"; flight numbers "LH 1234"
    r"\b[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2}\b",
    r"\b[A-Z]{2}\s\d{5}(?:-\d{4})?\b",
    r"\b[A-Z]{2}\s\d{3,4}\b",
)
# ids and codes mixing capitals and digits: 8834-2219-AB, INV-2024-00417, 1Z999AA1012, QX7T9P
_MIXED_ID = (
    r"(?<![\w-])(?=[A-Z0-9-]*[A-Z])(?=[A-Z0-9-]*\d)[A-Z0-9]+(?:-[A-Z0-9]+)+(?![\w-])",
    r"(?<![\w-])(?=[A-Z]*\d)(?=\d*[A-Z])[A-Z0-9]{5,}(?![\w-])",
)
# a number named by the word before it: "Flat 3", "room 305", "seat 14C", "order #4412", "build 20240611",
# "v2.1.0"; "order 2 meals" and "seat 4 people" are quantities, so an order, ticket or seat number needs
# a '#', three or more digits, or a seat letter
_LABELLED = (r"\b(?:[Ff]lat|[Aa]pt|[Aa]partment|[Ss]uite|[Rr]oom)\s*#?\d+[A-Z]?\b"
             r"|\b(?:[Tt]icket|[Oo]rder|[Bb]uild|[Ss]eat)\s*(?:#\s*\d+|\d{3,}|\d{1,2}[A-F])\b"
             r"|#\d+\b|\bv\d+\.\d+(?:\.\d+)*\b")


def _group(first: str, alternatives: tuple[str, ...]) -> str:
    return f"(?={first})(?:{'|'.join(f'(?:{a})' for a in alternatives)})"


_IDENTIFIER = re.compile("|".join((
    _group(r"[\dA-Z]", _MIXED_ID),  # first: "1Z999AA…" is one id, not a number then letters
    _group(r"[\d+(]", _STARTS_WITH_DIGIT),
    _group("[A-Z]", _STARTS_WITH_CAPITAL),
    _group("[#FfAaSsRrTtOoBbv]", (_LABELLED,)),
)))
_DIGIT = re.compile(r"\d")


def mask_identifiers(text: str) -> tuple[str, int]:
    """The text with identifier spans replaced by a space, and how many there were."""
    if _DIGIT.search(text) is None:  # the common case for chat: nothing to mask, no regex pass
        return text, 0
    count = 0

    def blank(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return " "

    return _IDENTIFIER.sub(blank, text), count
