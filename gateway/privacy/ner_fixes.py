"""Corrections to the small spaCy model's entity labels, from the text around each entity.

Measured on presidio-evaluator's corpus (benchmarks/pii_eval.py), en_core_web_sm's three most
common mistakes on personal data are: person names tagged ORG (which presidio ignores, so the
name leaks), places tagged PERSON after an unmistakable cue ("I'm in Þorlákshöfn"), and entities
running over a line break into the next line ("Zeliha Sultygov\\n\\nMental"). Each is fixed here
by shape and context, never by a list of names.
"""

from __future__ import annotations

import regex
from spacy.lang.en.stop_words import STOP_WORDS
from spacy.tokens import Doc, Span

from gateway.privacy.not_personal import not_personal
from gateway.privacy.places import PLACE_CUE_BEFORE, is_known_place

NER_SCORE = 0.85  # presidio's default score for a spaCy entity
# An ORG that is shaped like a person's name scores lower: it must not beat a pattern finding.
ORG_AS_PERSON_SCORE = 0.6

# Words that make a span an organisation, not a person (Acme Corp, Bank of X, Kudan Inc.).
_ORG_WORDS = regex.compile(
    r"(?i)(?<![\p{L}])(?:inc|ltd|llc|llp|lp|corp|co|cos|company|companies|corporation|group|bank|banco|"
    r"holdings?|plc|gmbh|ag|kg|sa|spa|sas|sarl|srl|bv|nv|ab|asa|oy|oyj|kk|pty|pte|limited|partners|capital|"
    r"fund|funds|trust|university|universit\w*|college|school|academy|institute|association|foundation|"
    r"society|club|agency|labs?|systems|solutions|technolog\w*|tech|software|services|international|"
    r"industr\w*|energy|airlines?|airways|motors|pharma\w*|financial|finance|insurance|enterprises?|"
    r"media|studios?|records|hotels?|restaurant|church|hospital|council|ministry|department|committee|"
    r"party|union|league|team|fc|news|times|press|etf|index|reit|acquisitions?|the|of|and|&|"
    r"consulting|communications|networks?|electric|power|resources|investments?|properties|realty|"
    r"trading|logistics|health|healthcare|medical|foods?|brands|products|global|worldwide|ventures|"
    r"google|microsoft|apple|amazon|meta|facebook|openai|anthropic|netflix|tesla|nvidia|intel|ibm|oracle|"
    r"github|gitlab|slack|twitter|linkedin|youtube|uber|airbnb|spotify|samsung|sony|toyota|walmart)"
    r"(?![\p{L}])"
)
# Title-case words (Ágnes, O'Neil, Jean-Luc), an optional middle initial, particles (van der).
_PERSON_SHAPE = regex.compile(
    r"^\p{Lu}[\p{Ll}\p{M}'’-]+(?:[ ]\p{Lu}\.?)?"
    r"(?:[ ](?:(?:van|von|de|da|der|den|di|du|le|la|del|dos|ter|ten|bin|ibn|al)[ ])*\p{Lu}[\p{Ll}\p{M}'’-]+){0,3}$"
)


_TRAILING_ADDRESS_WORD = regex.compile(r"[ \t]+(?:Apt|Apartment|Suite|Ste|Unit|Flat)\.?$")


# A single word tagged ORG is as often a brand or a capitalised noun ("Wisdom") as a first name:
# it counts as a person only with a cue around it.
_PERSON_CUE_BEFORE = regex.compile(
    r"(?i:\b(?:(?:named|called)(?:[ \t]+(?:him|her|them))?|kid|son|daughter|wife|husband|partner|friend|brother|sister|mother|father|mom|"
    r"mum|dad|boss|colleague|manager|assistant to|meet|met|told|tell|ask|asked|thank|thanks|dear|hi|hello|"
    r"hey|by|with|and|said|to|for|from|cc|me,?|i'm|i am)[ \t]+)$"
)
_PERSON_CUE_AFTER = regex.compile(
    r"^(?:[ \t]*:|'s\b|’s\b|[ \t]+(?i:said|says|shouted|told|asked|replied|wrote|spent|lives|lived|began|"
    r"thinks|thought|smiled|laughed|cried|whispered|answered))"
)


# Cues that leave no doubt (no prepositions: "to Marina" may be the town).
_STRICT_PERSON_CUE_BEFORE = regex.compile(
    r"(?i:\b(?:(?:named|called)(?:[ \t]+(?:him|her|them))?|kid|son|daughter|wife|husband|friend|brother|"
    r"sister|mother|father|mom|mum|dad|boss|colleague|dear|hi|hello|hey|thanks|told|asked|met|said to|"
    r"shouted at|said)[ \t]+)$"
)
_STRICT_PERSON_CUE_AFTER = regex.compile(
    r"(?:[ \t]*:|[ \t]+(?i:said|says|shouted|told|asked|replied|wrote|smiled|laughed|cried|whispered|answered|"
    r"has been|was born|is a|spent))"
)
_ORG_SUFFIX = regex.compile(r"(?i)(?<![\p{L}])(?:ltd|inc|llc|corp|plc|gmbh|co\.ltd|co\.,? ?ltd)(?![\p{L}])")


def _looks_like_person(text: str, before: str, after: str) -> bool:
    if not _PERSON_SHAPE.match(text) or _ORG_WORDS.search(text) or text.lower() in STOP_WORDS:
        return False
    return " " in text or bool(_PERSON_CUE_BEFORE.search(before) or _PERSON_CUE_AFTER.match(after))


def corrected_entities(doc: Doc, score: float = NER_SCORE) -> tuple[list[Span], list[float]]:
    """The Doc's entities with the corrections above, and a score for each."""
    text = doc.text
    spans: list[Span] = []
    scores: list[float] = []
    for ent in doc.ents:
        start, end, label, s = ent.start_char, ent.end_char, ent.label_, score
        # Never run over a line break: what follows is another field (a job title, a street).
        newline = text.find("\n", start, end)
        if newline > start:
            end = newline
        if text.endswith(("'s", "’s"), start, end) and end - start > 2:
            end -= 2  # "Angel Longino's": the possessive is not part of the name
        if label in ("GPE", "LOC") and _ORG_SUFFIX.search(text, start, end):
            continue  # "THK CO.LTD": a company suffix, not Colorado
        if label == "PERSON":
            # "Erin Rukavina Suite 241": the unit word belongs to the address that follows.
            trailing = _TRAILING_ADDRESS_WORD.search(text, start, end)
            if trailing and trailing.start() > start:
                end = trailing.start()
        if label in ("ORG", "PERSON") and is_known_place(text[start:end]):
            label = "GPE"
        elif label == "ORG":
            if not _looks_like_person(text[start:end].strip(), text[max(0, start - 30) : start], text[end : end + 12]):
                spans.append(ent)
                scores.append(s)
                continue
            label, s = "PERSON", ORG_AS_PERSON_SCORE
        if label == "PERSON" and PLACE_CUE_BEFORE.search(text, max(0, start - 40), start):
            label, s = "GPE", score  # "moved here from Gibraleón", whether NER said PERSON or ORG
        elif (
            label == "GPE"
            and _PERSON_SHAPE.match(text[start:end])
            and (
                _STRICT_PERSON_CUE_BEFORE.search(text, max(0, start - 30), start)
                or _STRICT_PERSON_CUE_AFTER.match(text, end)
            )
        ):
            label = "PERSON"  # "my kid Kateřina", "Claudia: ...": a first name NER took for a town
        if label in ("PERSON", "GPE", "LOC", "FAC", "NORP") and not_personal(text, start, end):
            continue  # "Docker Swarm", "Convert this ...", "into English": not personal data
        if (start, end, label) == (ent.start_char, ent.end_char, ent.label_):
            spans.append(ent)
        else:
            span = doc.char_span(start, end, label=label, alignment_mode="contract")
            if span is None or not span.text.strip():
                continue
            spans.append(span)
        scores.append(s)
    return spans, scores
