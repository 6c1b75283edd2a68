"""Run a regex only over the stretches of a text where it can match, with identical results.

Most PII patterns cannot match without a digit (phone numbers, licences, dates, SSNs) or a
particular punctuation mark (the dot of a URL, the colon of an IPv6 address), yet `finditer`
tries them at every position of the text: presidio's URL patterns alone cost ~0.45 ms per KB of
plain prose. `gate(compiled)` reads the pattern's syntax tree and, when it can *prove* that

1. every match contains a character of a gate class (a digit, or one punctuation mark), and
2. every match either contains no whitespace or is at most W characters long, and
3. every look-around reads a bounded number of characters,

returns a `GatedRegex` whose `finditer` scans only windows around the gate characters: the
whitespace-delimited chunk holding one (2, no whitespace) or W characters either side (2, bounded),
plus a margin for look-arounds. Any match of the pattern lies inside such a window, so scanning
the windows in order yields exactly the matches a scan of the whole text yields, in the same
order. When anything cannot be proven (an unbounded look-around, syntax `re` cannot parse), the
pattern is returned as it is. tests/privacy/test_regex_gate.py checks the equality on real and
generated texts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from re import _constants as C  # type: ignore[attr-defined]  # the parser's opcodes (private, no stubs)
from re import _parser as sre  # type: ignore[attr-defined]
from typing import Any

import regex

# Windows closer than this are scanned as one: a call costs more than scanning a short gap (each
# call with a timeout is ~3 us of `regex` set-up, ~150 characters of a simple pattern's scan).
_JOIN_GAP = 128
_UNBOUNDED = 10_000  # a width or look-around this long is treated as unbounded
# Tried in this order: the rarer in prose, the smaller the windows.
_LITERAL_GATES = "@#:/+_.-"
_DIGIT = "digit"
_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT)
# Whitespace as the chunk splitter (`regex`'s \s) sees it. Every Unicode space is below U+3100.
_SPACE_RX = regex.compile(r"\s")
_SPACES = tuple(chr(c) for c in range(0x3100) if _SPACE_RX.match(chr(c)))
_CATEGORY_RX = {
    C.CATEGORY_DIGIT: r"\d", C.CATEGORY_NOT_DIGIT: r"\D", C.CATEGORY_SPACE: r"\s", C.CATEGORY_NOT_SPACE: r"\S",
    C.CATEGORY_WORD: r"\w", C.CATEGORY_NOT_WORD: r"\W", C.CATEGORY_LINEBREAK: r"\n", C.CATEGORY_NOT_LINEBREAK: r"[^\n]",
}


@dataclass(frozen=True)
class Gate:
    char: str  # "digit", or the one character every match contains
    chunked: bool  # windows are whitespace-delimited chunks (else `width` either side)
    width: int  # the longest match (0 when chunked: a chunk bounds the match instead)
    margin: int  # characters of context the look-arounds read, plus one
    # (chunked only) the gate character is followed, within the match, by another character: a
    # full stop that ends a sentence cannot be the dot of a URL.
    followed: bool = False


# -- proofs over the parser's tree ------------------------------------------------------------


def _member_in_gate(op: Any, av: Any, gate: str) -> bool:
    """A class member (or a one-character item) matches only characters of the gate."""
    if gate == _DIGIT:
        if op is C.LITERAL:
            return chr(av).isdecimal()
        if op is C.RANGE:
            return av[1] - av[0] < 0x400 and all(chr(c).isdecimal() for c in range(av[0], av[1] + 1))
        return op is C.CATEGORY and av is C.CATEGORY_DIGIT
    if op is C.LITERAL:
        return chr(av) == gate
    return op is C.RANGE and av[0] == av[1] == ord(gate)


def _single(op: Any, av: Any, gate: str) -> bool:
    """One character, always of the gate."""
    return (op is C.LITERAL and _member_in_gate(op, av, gate)) or (
        op is C.IN and bool(av) and all(m_op is not C.NEGATE and _member_in_gate(m_op, m_av, gate) for m_op, m_av in av)
    )


def _requires(seq: Any, gate: str) -> bool:
    """Every match of `seq` consumes at least one character of the gate."""
    return any(_item_requires(op, av, gate) for op, av in seq)


def _item_requires(op: Any, av: Any, gate: str) -> bool:
    if op in (C.LITERAL, C.IN):
        return _single(op, av, gate)
    if op is C.SUBPATTERN:
        return _requires(av[3], gate)
    if op is C.ATOMIC_GROUP:
        return _requires(av, gate)
    if op is C.BRANCH:
        return all(_requires(alt, gate) for alt in av[1])
    if op in _REPEATS:
        return av[0] >= 1 and _requires(av[2], gate)
    return False  # anchors, look-arounds, back-references, conditionals, ANY, NOT_LITERAL


def _requires_followed(seq: Any, gate: str) -> bool:
    """Every match holds a gate character with at least one more character of the match after it."""
    items = list(seq)
    for i, (op, av) in enumerate(items):
        if _single(op, av, gate) and i + 1 < len(items) and sre.SubPattern(seq.state, items[i + 1:i + 2]).getwidth()[0] >= 1:
            return True
        if op is C.SUBPATTERN and _requires_followed(av[3], gate):
            return True
        if op is C.ATOMIC_GROUP and _requires_followed(av, gate):
            return True
        if op is C.BRANCH and all(_requires_followed(alt, gate) for alt in av[1]):
            return True
        if op in _REPEATS and av[0] >= 1 and _requires_followed(av[2], gate):
            return True
    return False


def _class_matches(members: Any, ch: str, engine: Any) -> bool:
    hit = False
    negate = False
    for op, av in members:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            hit = hit or chr(av) == ch
        elif op is C.RANGE:
            hit = hit or av[0] <= ord(ch) <= av[1]
        elif op is C.CATEGORY:
            rx = _CATEGORY_RX.get(av)
            hit = hit or rx is None or engine.match(rx, ch) is not None
        else:
            return True  # unknown member: assume it can
    return hit != negate


def _can_consume_space(seq: Any, engine: Any) -> bool:
    """Some match of `seq` may consume a whitespace character (conservative: True when unsure)."""
    for op, av in seq:
        if op is C.LITERAL:
            if chr(av) in _SPACES:
                return True
        elif op is C.IN:
            if any(_class_matches(av, ch, engine) for ch in _SPACES):
                return True
        elif op is C.SUBPATTERN:
            if _can_consume_space(av[3], engine):
                return True
        elif op is C.ATOMIC_GROUP:
            if _can_consume_space(av, engine):
                return True
        elif op is C.BRANCH:
            if any(_can_consume_space(alt, engine) for alt in av[1]):
                return True
        elif op in _REPEATS:
            if _can_consume_space(av[2], engine):
                return True
        elif op in (C.AT, C.ASSERT, C.ASSERT_NOT):
            continue  # zero-width
        else:
            return True  # ANY, NOT_LITERAL, back-references, conditionals
    return False


def _context(seq: Any) -> int:
    """Characters of context the pattern's zero-width assertions read beyond a match."""
    need = 0
    for op, av in seq:
        if op in (C.ASSERT, C.ASSERT_NOT):
            need = max(need, av[1].getwidth()[1], _context(av[1]))
        elif op is C.AT:
            need = max(need, 1)  # \b, $, ^ look at one neighbour
        elif op is C.SUBPATTERN:
            need = max(need, _context(av[3]))
        elif op is C.ATOMIC_GROUP:
            need = max(need, _context(av))
        elif op is C.BRANCH:
            need = max(need, *(_context(alt) for alt in av[1]))
        elif op in _REPEATS:
            need = max(need, _context(av[2]))
        elif op is C.GROUPREF_EXISTS:
            need = max(need, *(_context(p) for p in av[1:] if p is not None))
    return need


# Flags that mean the same to `re`'s parser as to the engine. Any other (`regex`'s full case
# folding, POSIX or fuzzy matching, reversed search) changes what a match can be: no gate.
_PLAIN_FLAGS = re.I | re.M | re.S | re.X | re.U | re.A | regex.VERSION0


def find_gate(source: str, flags: int, engine: Any = regex) -> Gate | None:
    """The gate proven for this pattern, or None."""
    if flags & ~_PLAIN_FLAGS:
        return None
    try:
        tree = sre.parse(source, flags & ~regex.VERSION0)
    except Exception:  # syntax only `regex` knows (\p{L}, set operations): no proof, no gate
        return None
    width = tree.getwidth()[1]
    context = _context(tree)
    if context >= _UNBOUNDED:
        return None
    chunked = not _can_consume_space(tree, engine)
    if not chunked and width >= _UNBOUNDED:
        return None
    for char in (*_LITERAL_GATES[:4], _DIGIT, *_LITERAL_GATES[4:]):
        if _requires(tree, char):
            followed = chunked and char != _DIGIT and _requires_followed(tree, char)
            return Gate(char=char, chunked=chunked, width=0 if chunked else width, margin=context + 1,
                        followed=followed)
    return None


# -- scanning ---------------------------------------------------------------------------------

_DIGIT_RUN = regex.compile(r"\d+")
_SPACE_BEFORE = regex.compile(r"\s", flags=regex.REVERSE)


def _gate_spans(text: str, gate: Gate) -> Iterator[tuple[int, int]]:
    if gate.char == _DIGIT:
        for m in _DIGIT_RUN.finditer(text):
            yield m.span()
        return
    n = len(text)
    i = text.find(gate.char)
    while i >= 0:
        # A chunked match holds no whitespace: a gate character it must continue after is
        # followed by something other than whitespace.
        if not gate.followed or (i + 1 < n and not _SPACE_RX.match(text, i + 1)):
            yield i, i + 1
        i = text.find(gate.char, i + 1)


# The windows of the text analysed last, by gate: a text is analysed by some forty patterns,
# most of them sharing a gate. Replaced whole (never mutated in place) so threads cannot mix texts.
_last: tuple[str, dict[Gate, list[tuple[int, int]]]] = ("", {})


def windows(text: str, gate: Gate) -> list[tuple[int, int]]:
    """Merged [start, end) stretches of `text` holding every possible match of a gated pattern."""
    global _last
    seen_text, cache = _last
    if seen_text is not text:
        cache = {}
        _last = (text, cache)
    found = cache.get(gate)
    if found is None:
        found = cache[gate] = _windows(text, gate)
    return found


def _windows(text: str, gate: Gate) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    n = len(text)
    chunk_end = -1
    for a, b in _gate_spans(text, gate):
        if gate.chunked:
            if a < chunk_end:
                continue  # the same chunk as the previous gate character
            m = _SPACE_BEFORE.search(text, 0, a)
            start = m.end() if m else 0
            m = _SPACE_RX.search(text, b)
            end = chunk_end = m.start() if m else n
        else:
            start, end = a - gate.width, b + gate.width
        start, end = max(0, start - gate.margin), min(n, end + gate.margin)
        if out and start <= out[-1][1] + _JOIN_GAP:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


class GatedRegex:
    """A compiled pattern whose `finditer` scans only the windows where it can match."""

    def __init__(self, compiled: Any, gate: Gate) -> None:
        self.compiled = compiled
        self.gate = gate
        self.pattern = compiled.pattern
        self.flags = compiled.flags

    def finditer(self, text: str, **kwargs: Any) -> Iterator[Any]:
        for a, b in windows(text, self.gate):
            yield from self.compiled.finditer(text, a, b, **kwargs)

    def __repr__(self) -> str:
        return f"GatedRegex({self.pattern[:40]!r}, {self.gate})"


def gate(compiled: Any) -> Any:
    """`compiled` as a GatedRegex when a gate is proven for it, else `compiled` itself."""
    engine = re if isinstance(compiled, re.Pattern) else regex
    found = find_gate(compiled.pattern, compiled.flags, engine)
    return compiled if found is None else GatedRegex(compiled, found)
