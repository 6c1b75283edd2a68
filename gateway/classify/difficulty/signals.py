"""Cheap, model-free difficulty signals read from an OpenAI chat request.

Each signal is a small non-negative number with a short name; the names (never the prompt text)
are what `explain` shows. `vector()` turns them into the fixed-order numeric vector the fitted
model and the heuristic score both use, on a log scale so one very long prompt cannot dominate.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

from gateway.classify.difficulty.identifiers import mask_identifiers
from gateway.classify.text import content_text, last_user_text

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?:\.\d+)?%?")
_FENCE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)
# A line that looks like source code: keywords that open statements, or a line ending in ; { }
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |#include|public |private |function |const |let |var |"
    r"return\b|for\s*\(|while\s*\(|if\s*\(|SELECT |\}|.*[;{]\s*$)",
    re.MULTILINE,
)
# Each branch of the math pattern is paired with what it cannot match without; per prompt only the
# branches that can match are compiled into the alternation (cached), which gives the same matches
# as the full pattern at a quarter of its cost: re tries every branch at every position otherwise.
_MATH_BRANCHES: tuple[tuple[str, str | None], ...] = (
    (r"\\(frac|sqrt|int|sum|prod|lim|alpha|beta|theta|pi|cdot|times|leq|geq|neq|infty|partial)\b", "\\"),
    (r"[=<>≤≥≠±×÷√∑∏∫∂∞π^]", None),
    (r"\$[^$\n]+\$", "$"),
    (r"\b\d+\s*[-+*/]\s*\d+\b", "digit"),
    (r"\b[a-z]\s*\^\s*\d", "^"),
    (r"\bf\([a-z]\)", "f("),
)
_MATH = re.compile("|".join(b for b, _ in _MATH_BRANCHES))  # the reference: what _math_count counts
_DIGIT = re.compile(r"\d")


@functools.lru_cache(maxsize=64)
def _math_pattern(present: tuple[bool, ...]) -> re.Pattern[str]:
    return re.compile("|".join(b for (b, _), on in zip(_MATH_BRANCHES, present, strict=True) if on))


def _math_count(text: str) -> int:
    present = tuple(
        need is None or (_DIGIT.search(text) is not None if need == "digit" else need in text)
        for _, need in _MATH_BRANCHES
    )
    return len(_math_pattern(present).findall(text))


# Cue words are counted by set lookup over the lower-cased words (one regex pass for all three
# lists): big alternation regexes with IGNORECASE cost ~0.5 ms each per prompt.
_REASONING_WORDS = frozenset(
    ["why", "explain", "prove", "proof", "derive", "justify", "reason", "reasoning", "analyze", "analyse", "evaluate", "compare", "contrast", "calculate", "compute", "solve", "estimate", "determine", "infer", "deduce", "implement", "design", "optimize", "optimise", "debug", "refactor", "algorithm", "complexity", "tradeoff", "tradeoffs"]
)
_REASONING_PHRASES = ("step by step", "step-by-step", "how many", "how much", "how long", "how far",
                      "how often", "trade-off")
_STEP_WORDS = frozenset(
    ["first", "firstly", "second", "secondly", "third", "then", "next", "afterwards", "finally", "lastly", "subsequently", "also"]
)
_STEP_PHRASES = ("after that", "in addition")
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+", re.MULTILINE)
_CONSTRAINT_WORDS = frozenset(
    ["must", "should", "shall", "exactly", "only", "without", "never", "always", "avoid", "ensure", "require", "required", "format", "within", "limit", "limited", "word", "words", "sentence", "sentences", "bullet", "bullets", "json", "table", "don't"]
)
_CONSTRAINT_PHRASES = ("need to", "has to", "have to", "at least", "at most", "no more than",
                       "no less than", "fewer than", "less than", "more than", "do not", "make sure")
_LOWER_WORD = re.compile(r"[a-z][a-z'-]*")
_QUESTION = re.compile(r"\?")
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


@dataclass(frozen=True)
class Signals:
    chars: int
    tokens: int  # rough word-piece count: words and punctuation marks
    code_blocks: int  # fenced blocks plus 1 per 5 code-looking lines
    math: int  # math operators, LaTeX, inline arithmetic
    numbers: int
    reasoning_cues: int
    step_cues: int  # sequencing words and list items: multi-step requests
    constraints: int
    questions: int
    turns: int  # user turns in the conversation
    tools: int
    non_english: float  # share of letters outside ASCII (0..1)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SIGNAL_NAMES}  # asdict() deep-copies: 10x slower


# The order of the numeric vector; the artefact stores it and refuses a different one.
SIGNAL_NAMES: tuple[str, ...] = tuple(Signals.__dataclass_fields__)


def _count(words: list[str], lower: str, vocab: frozenset[str], phrases: tuple[str, ...]) -> int:
    return sum(1 for w in words if w in vocab) + sum(lower.count(p) for p in phrases)


# Signals are read from at most this many characters (the length ones extrapolated to the whole
# text): the classifier may run on the event loop, and a 1 MB prompt took 1.3 s of regexes here.
# Every prompt in the routing data is shorter, so the fitted weights are unaffected.
SIGNAL_CHARS_MAX = 32_768


def extract_text_signals(text: str, *, turns: int = 1, tools: int = 0) -> Signals:
    return _extract(text, turns=turns, tools=tools)[0]


def _extract(text: str, *, turns: int, tools: int) -> tuple[Signals, str]:
    """The signals, and the text they were read from with identifiers blanked (the embedding's)."""
    full_chars = len(text)
    if full_chars > SIGNAL_CHARS_MAX:
        text = text[:SIGNAL_CHARS_MAX]
    if text.isascii():  # the common case: no letter outside ASCII, no need to list the letters
        letters, non_ascii = [], 0
    else:
        letters = _LETTER.findall(text)
        non_ascii = sum(1 for ch in letters if ord(ch) > 127)
    lower = text.lower()
    words = _LOWER_WORD.findall(lower)
    # Phone numbers, ids, dates and postcodes are not maths (issue #21: "+1 415-555-0199" scored hard)
    numeric, _ = mask_identifiers(text)
    fences = len(_FENCE.findall(text)) // 2
    code_lines = len(_CODE_LINE.findall(text))
    signals = Signals(
        chars=full_chars,
        tokens=round(len(_WORD.findall(text)) * full_chars / max(len(text), 1)),
        code_blocks=fences + code_lines // 5,
        math=_math_count(numeric),
        numbers=len(_NUMBER.findall(numeric)),
        reasoning_cues=_count(words, lower, _REASONING_WORDS, _REASONING_PHRASES),
        step_cues=_count(words, lower, _STEP_WORDS, _STEP_PHRASES) + len(_LIST_ITEM.findall(text)),
        constraints=_count(words, lower, _CONSTRAINT_WORDS, _CONSTRAINT_PHRASES),
        questions=len(_QUESTION.findall(text)),
        turns=turns,
        tools=tools,
        non_english=round(non_ascii / len(letters), 4) if letters else 0.0,
    )
    return signals, numeric


def request_text(body: dict[str, Any]) -> str:
    """The text the difficulty is judged on: the last user message (the task being asked now)."""
    return last_user_text(body)


def judged_text(body: dict[str, Any]) -> str:
    """The last user message, or (e.g. the last turn is a tool result) whatever text there is."""
    return request_text(body) or "\n".join(
        content_text(m.get("content")) for m in body.get("messages") or [] if isinstance(m, dict))


@dataclass(frozen=True)
class Reading:
    """One pass over a request: what every part of the difficulty classifier reads."""

    signals: Signals
    text: str  # the judged text, at most SIGNAL_CHARS_MAX characters: what the cues read
    # The last user message so cut, with phone numbers, ids and dates blanked (their digit word
    # pieces sit next to GSM8K's arithmetic in the embedding space): what the embedding reads.
    embedding_text: str


def read(body: dict[str, Any]) -> Reading:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    turns = sum(1 for m in messages if m.get("role") == "user")
    tools = len(body.get("tools") or []) + len(body.get("functions") or [])
    own = request_text(body)
    text = own or judged_text(body)
    signals, masked = _extract(text, turns=max(turns, 1), tools=tools)
    return Reading(signals, text[:SIGNAL_CHARS_MAX], (masked if own else "") or " ")


def extract_signals(body: dict[str, Any]) -> Signals:
    return read(body).signals


def embedding_text(body: dict[str, Any]) -> str:
    return read(body).embedding_text


def vector(s: Signals) -> list[float]:
    """Fixed-order numeric vector: log1p of counts, the non-English share as is."""
    return [
        float(v) if name == "non_english" else math.log1p(float(v))
        for name, v in zip(SIGNAL_NAMES, (getattr(s, n) for n in SIGNAL_NAMES), strict=True)
    ]
