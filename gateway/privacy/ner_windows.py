"""Where in a prompt NER needs to look for names, places and nationalities.

Those entities are proper nouns, and in English a proper noun has an upper-case letter. Most of
a prompt (instructions, code, questions) has none beyond sentence-initial function words, yet
NER costs the same per token everywhere. So, when the policy grades only those entities, NER
reads windows around candidate tokens (fast_ner.FastNer takes the windows).

A window keeps `MARGIN` tokens of context each side, which makes the result the same as a
whole-document pass for the candidates: the small English models' NER sees a token through a
CNN of depth 4 (four tokens each way), and its transition features look one token back and at
the open entity's start, which lies inside the window. Lower-case names ("call john tomorrow")
are not NER's strength either way; the cue recognizers catch them on the whole text.
benchmarks/pii_eval.py measures the detection quality with windows on.
"""

from __future__ import annotations

from spacy.lang.en.stop_words import STOP_WORDS
from spacy.tokens import Doc

MARGIN = 6
# When windows would cover most of the prompt anyway, a whole pass costs no more and is exact.
_WHOLE_DOC_SHARE = 0.8


def _is_candidate(text: str, lower: str) -> bool:
    """Upper case somewhere and not a common word; acronyms of stop words ("US", "IT") count."""
    if text == lower:  # no upper-case letter: most tokens stop here
        return False
    return lower not in STOP_WORDS or (len(text) > 1 and text.isupper())


def candidate_windows(doc: Doc, margin: int = MARGIN) -> list[tuple[int, int]]:
    """Token ranges [start, end) around candidate tokens, merged where they touch; the whole
    document as one range when that is nearly all of it."""
    windows: list[tuple[int, int]] = []
    n = len(doc)
    for tok in doc:
        if not _is_candidate(tok.text, tok.lower_):
            continue
        start, end = max(0, tok.i - margin), min(n, tok.i + 1 + margin)
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    if sum(end - start for start, end in windows) >= _WHOLE_DOC_SHARE * n:
        return [(0, n)] if n else []
    return windows
