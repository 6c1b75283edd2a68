"""Payment card numbers: the issuer (IIN) ranges of the major schemes, their lengths, and Luhn.

A number of 12-19 digits, written whole or in groups separated by single spaces or dashes (any
grouping), is a card when its prefix falls in a scheme's range, its length is one that scheme
issues, and its Luhn checksum holds. presidio's card pattern knows only the older prefixes
(no Mastercard 2221-2720, no 19-digit Visa); this table is the current ranges (ISO/IEC 7812
registrations as the schemes publish them), kept broad where a scheme's ranges are scattered.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from gateway.privacy.regex_gate import gate


@dataclass(frozen=True)
class IinRange:
    scheme: str
    low: str  # prefix range, inclusive; both ends the same number of digits
    high: str
    lengths: tuple[int, ...]

    def covers(self, digits: str) -> bool:
        head = digits[: len(self.low)]
        return len(digits) in self.lengths and self.low <= head <= self.high


def _r(scheme: str, low: str, high: str | None, lengths: range | tuple[int, ...]) -> IinRange:
    return IinRange(scheme, low, high or low, tuple(lengths))


IIN_RANGES: tuple[IinRange, ...] = (
    _r("Visa", "4", None, (13, 16, 19)),
    _r("Mastercard", "51", "55", (16,)),
    _r("Mastercard", "2221", "2720", (16,)),
    _r("American Express", "34", None, (15,)),
    _r("American Express", "37", None, (15,)),
    _r("Discover", "6011", None, range(16, 20)),
    _r("Discover", "644", "649", range(16, 20)),
    _r("Discover", "65", None, range(16, 20)),
    _r("Discover", "622126", "622925", range(16, 20)),
    _r("JCB", "3528", "3589", range(16, 20)),
    # JCB's pre-3528 blocks, still issued in some card generators and old stock.
    _r("JCB", "3088", "3094", (16,)),
    _r("JCB", "3096", "3102", (16,)),
    _r("JCB", "3112", "3120", (16,)),
    _r("JCB", "3158", "3159", (16,)),
    _r("JCB", "3337", "3349", (16,)),
    _r("JCB", "2131", None, (15,)),
    _r("JCB", "1800", None, (15,)),
    _r("UnionPay", "62", None, range(16, 20)),
    _r("UnionPay", "81", None, range(16, 20)),
    _r("Diners Club", "300", "305", range(14, 20)),
    _r("Diners Club", "3095", None, range(14, 20)),
    _r("Diners Club", "36", None, range(14, 20)),
    _r("Diners Club", "38", "39", range(14, 20)),
    # Maestro's published prefixes (5018, 5020, 5038, 5893, 6304, 6759, 6761-6763) lie inside
    # the older 50 and 56-69 blocks still on cards in circulation.
    _r("Maestro", "50", None, range(12, 20)),
    _r("Maestro", "56", "69", range(12, 20)),
    _r("Mir", "2200", "2204", range(16, 20)),
    _r("RuPay", "82", None, (16,)),
    _r("RuPay", "353", None, (16,)),
    _r("RuPay", "356", None, (16,)),
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    """`prefix` followed by the check digit that makes it pass Luhn."""
    return prefix + next(d for d in "0123456789" if luhn_ok(prefix + d))


def scheme_of(digits: str) -> str | None:
    """The scheme whose range and length fit a Luhn-valid digit string, else None."""
    if not 12 <= len(digits) <= 19 or not luhn_ok(digits):
        return None
    return next((r.scheme for r in IIN_RANGES if r.covers(digits)), None)


# A run of digit groups separated by single spaces or dashes; groups are never split (a longer
# number is not a card), but a run may hold a card among other numbers ("ref 2024 4111 ...").
# Bounded (19 groups of at most 19 digits) so that the regex gate can prove its windows.
CARD_RUN = gate(re.compile(r"(?<![\w.,])\d{1,19}(?!\d)(?:[ -]\d{1,19}(?!\d)){0,18}"))
_GROUP = re.compile(r"\d+")


def find_cards(text: str) -> list[tuple[int, int, int]]:
    """(start, end, number of digits) of every card number in `text`."""
    out: list[tuple[int, int, int]] = []
    for run in CARD_RUN.finditer(text):
        if run.end() - run.start() < 12:
            continue
        groups = [(g.start(), g.end()) for g in _GROUP.finditer(run.group(0))]
        i = 0
        while i < len(groups):
            found = _longest_card_from(run.group(0), groups, i)
            if found is None:
                i += 1
                continue
            j, n = found
            out.append((run.start() + groups[i][0], run.start() + groups[j][1], n))
            i = j + 1
    return out


def _longest_card_from(run: str, groups: list[tuple[int, int]], i: int) -> tuple[int, int] | None:
    best = None
    digits = ""
    for j in range(i, len(groups)):
        a, b = groups[j]
        # Single-digit groups ("1 2 3 4 ...") are lists, not cards; the last group may be short.
        if b - a < 2 and j > i and j + 1 < len(groups):
            break
        digits += run[a:b]
        if len(digits) > 19:
            break
        if len(digits) >= 12 and scheme_of(digits):
            best = (j, len(digits))
    return best


def card_specimen(iin: IinRange, rng: random.Random, length: int | None = None) -> str:
    """A Luhn-valid number in the range (tests and benchmarks; never a real card by intent)."""
    n = length or iin.lengths[0]
    low, high = int(iin.low), int(iin.high)
    head = str(rng.randint(low, high)).rjust(len(iin.low), "0")
    body = head + "".join(rng.choice("0123456789") for _ in range(n - len(head) - 1))
    return luhn_complete(body)
