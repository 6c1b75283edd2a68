"""Recognizers we add to presidio's: secrets, a fast phone recognizer, an offline e-mail
recognizer, and the custom recognizers a policy declares.

Secrets are matched by their documented formats (the table in credentials.py) with scores high
enough to pass any sane threshold without context words; card numbers by issuer range and Luhn
(cards.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import phonenumbers
import tldextract
from presidio_analyzer import (
    AnalysisExplanation,
    EntityRecognizer,
    LocalRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerResult,
)
from presidio_analyzer.nlp_engine import NlpArtifacts
from presidio_analyzer.predefined_recognizers import EmailRecognizer

from gateway.privacy.address import find_addresses
from gateway.privacy.cards import find_cards
from gateway.privacy.config import CustomRecognizer
from gateway.privacy.credentials import CREDENTIAL_FORMATS, CredentialFormat, checksum_ok
from gateway.privacy.places import find_nationalities, find_places
from gateway.privacy.regex_gate import gate


class _InProcess(LocalRecognizer):
    """A recognizer whose patterns and tables are built at import: nothing to load."""

    def load(self) -> None:
        pass


class _SpanFinder(_InProcess):
    """One entity type, found by a function of the text returning (start, end, score) spans."""

    entity: str

    @staticmethod
    def find(text: str) -> list[tuple[int, int, float]]:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__(supported_entities=[self.entity], name=type(self).__name__)

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        return [_result(self, self.entity, a, b, score) for a, b, score in self.find(text)]


class SecretRecognizer(_InProcess):
    """Credentials by their known formats (gateway/privacy/credentials.py): the reported span
    is the secret only, never its label.

    Each format's regex runs only when one of its needles (its prefixes, usually) is in the
    text. When two formats match overlapping text, a format with a known shape beats a generic
    label-based one, then the longer span wins, then the earlier row: one finding per secret,
    never two halves.
    """

    def __init__(self, formats: tuple[CredentialFormat, ...] = CREDENTIAL_FORMATS) -> None:
        self._formats = [(f, re.compile(f.pattern(), f.flags), f.needles or f.prefixes) for f in formats]
        super().__init__(supported_entities=sorted({f.entity for f in formats}), name="SecretRecognizer")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        lowered: str | None = None
        found: list[tuple[bool, int, int, int, int, CredentialFormat, float]] = []
        for index, (fmt, regex, needles) in enumerate(self._formats):
            if fmt.entity not in entities:
                continue
            if fmt.any_case:
                lowered = text.lower() if lowered is None else lowered
                if not any(n in lowered for n in needles):
                    continue
            elif not any(n in text for n in needles):
                continue
            matches = regex.finditer(text)
            if fmt.anchors:
                lowered = text.lower() if lowered is None else lowered
                if len(lowered) == len(text):  # else a case mapping moved offsets: scan it all
                    matches = _anchored(regex, text, lowered, fmt.anchors)
            for m in matches:
                if fmt.check is not None and not fmt.check(m):
                    continue
                start, end = m.span(fmt.group)
                score = 1.0 if checksum_ok(fmt, m.group(fmt.group)) else fmt.score
                found.append((fmt.generic, -(end - start), index, start, end, fmt, score))
        kept: list[tuple[int, int, CredentialFormat, float]] = []
        for _, _, _, start, end, fmt, score in sorted(found, key=lambda f: f[:3]):
            if all(end <= a or start >= b for a, b, _, _ in kept):
                kept.append((start, end, fmt, score))
        return [_result(self, fmt.entity, a, b, score) for a, b, fmt, score in sorted(kept, key=lambda k: k[0])]


_IDENTIFIER_REACH = 80  # how far before its label an identifier may start (GITHUB_ACTIONS_DEPLOY_TOKEN)


def _anchored(regex: re.Pattern[str], text: str, lowered: str, anchors: tuple[str, ...]) -> Iterator[re.Match[str]]:
    """The matches of `regex` starting at a word start (a letter or digit not preceded by one)
    of the identifier that runs into an anchor, in order and not overlapping: what finditer
    gives for a pattern whose every match is such an identifier up to its anchored label."""
    starts: set[int] = set()
    for anchor in anchors:
        i = lowered.find(anchor)
        while i >= 0:
            # Back over the identifier the label may close: GITHUB_TOKEN, db.password.
            p = i
            while p > 0 and i - p < _IDENTIFIER_REACH and (text[p - 1].isalnum() or text[p - 1] in "_.-"):
                p -= 1
            starts.update(q for q in range(p, i + 1) if text[q].isalnum() and (q == 0 or not text[q - 1].isalnum()))
            i = lowered.find(anchor, i + 1)
    end = 0
    for p in sorted(starts):
        if p < end:
            continue
        m = regex.match(text, p)
        if m is not None:
            end = max(m.end(), p + 1)
            yield m


def _result(rec: EntityRecognizer, entity: str, start: int, end: int, score: float) -> RecognizerResult:
    # presidio's context enhancer expects an explanation on every result.
    return RecognizerResult(
        entity,
        start,
        end,
        score,
        analysis_explanation=AnalysisExplanation(recognizer=rec.name, original_score=score),  # type: ignore[has-type]
        recognition_metadata={
            RecognizerResult.RECOGNIZER_NAME_KEY: rec.name,  # type: ignore[has-type]  # presidio sets it untyped
            RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: rec.id,
        },
    )


# Candidate phone numbers: an optional +country code, optional (area), then 2-4 digit groups.
_PHONE_CANDIDATE = gate(re.compile(
    r"(?<![\w+/.:-])(?:\+\d{1,3}[ \t.-]?)?(?:\(\d{1,5}\)[ \t.-]?)?\d{1,4}(?:[ \t.-]?\d{2,5}){1,4}(?:[ \t]?(?:x|ext\.?)[ \t]?\d{1,5})?(?![\w/:]|[-.]\d)"
))
_SSN_SHAPE = re.compile(r"^\d{3}-\d{2}-\d{4}$")
_DATE_SHAPE = re.compile(r"^\d{1,4}[-./]\d{1,2}[-./]\d{1,4}$")
_IPV4_SHAPE = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_SHORT_LOCAL = re.compile(r"^\d{2}([ .-])\d{2}\1\d{2}$")


class FastPhoneRecognizer(_InProcess):
    """Phone numbers: a regex finds candidates, python-phonenumbers validates them.

    Presidio's PhoneRecognizer runs phonenumbers' matcher over the whole text once per region
    (~30 ms for 1 KB here); validating only regex candidates gives the same answers in ~1 ms.
    """

    CONTEXT = [
        "phone", "number", "telephone", "tel", "cell", "cellphone", "mobile", "call", "fax", "whatsapp",
        "message", "messages", "text", "sms", "contact", "dial", "desk", "landline", "ring",
    ]
    REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR", "AU")
    # Tried only for numbers laid out like phone numbers (separators), to keep false alarms down.
    MORE_REGIONS = ("IE", "IT", "ES", "NL", "CH", "AT", "BE", "CZ", "PL", "SE", "DK", "NO", "MX", "JP")

    def __init__(self) -> None:
        super().__init__(supported_entities=["PHONE_NUMBER"], context=self.CONTEXT, name="FastPhoneRecognizer")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        out: list[RecognizerResult] = []
        for m in _PHONE_CANDIDATE.finditer(text):
            cand = m.group(0)
            digits = sum(c.isdigit() for c in cand)
            if _SHORT_LOCAL.match(cand):
                # 61 60 34: a 6-digit local number (Greenland, Faroes), only with a context word
                out.append(_result(self, "PHONE_NUMBER", m.start(), m.end(), 0.3))
                continue
            if not 7 <= digits <= 15 or _SSN_SHAPE.match(cand) or _DATE_SHAPE.match(cand) or _IPV4_SHAPE.match(cand):
                continue
            score = self._score(cand)
            if digits >= 13 and cand.isdigit():
                # 13-15 digits in one run, no + and no grouping: an order or account number far
                # more often than a phone number; a context word ("call", "phone") lifts it.
                score = min(score, 0.3)
            if score > 0:
                out.append(_result(self, "PHONE_NUMBER", m.start(), m.end(), score))
        return out

    def _score(self, cand: str) -> float:
        laid_out = cand.startswith(("+", "(")) or len(re.findall(r"[\s.()-]+", cand.strip())) >= 2
        regions: tuple[str | None, ...] = (
            (None,) if cand.startswith("+") else self.REGIONS + (self.MORE_REGIONS if laid_out else ())
        )
        possible = False
        for region in regions:
            try:
                num = phonenumbers.parse(cand, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(num):
                # Separators or a + make a bare digit run far more likely to be a phone number.
                formatted = cand.startswith("+") or any(c in cand for c in " -.()")
                return 0.75 if formatted else 0.5
            possible = possible or phonenumbers.is_possible_number(num)
        if possible and laid_out:
            return 0.45  # a number laid out like a phone number, just not in a known numbering plan
        return 0.3 if possible else 0.0


class CardNumberRecognizer(_InProcess):
    """Card numbers of 12-19 digits in a scheme's IIN range with a valid Luhn checksum
    (gateway/privacy/cards.py). Replaces presidio's CreditCardRecognizer, whose patterns miss
    19-digit Visa and the Mastercard 2-series (2221-2720)."""

    CONTEXT = ["credit", "card", "visa", "mastercard", "cc", "amex", "debit", "payment"]

    def __init__(self) -> None:
        super().__init__(supported_entities=["CREDIT_CARD"], context=self.CONTEXT, name="CardNumberRecognizer")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        return [
            _result(self, "CREDIT_CARD", a, b, 0.9 if digits >= 15 else 0.6) for a, b, digits in find_cards(text)
        ]


class StreetAddressRecognizer(_SpanFinder):
    """Street addresses as whole blocks (street, unit, town, region, postcode, country).

    spaCy's small model tags cities and countries (LOCATION) but not street addresses;
    gateway/privacy/address.py has the shapes.
    """

    entity = "STREET_ADDRESS"
    find = staticmethod(find_addresses)


class NationalityRecognizer(_SpanFinder):
    """Nationalities and peoples (NRP) by name: the small NER model misses most of them."""

    entity = "NRP"
    find = staticmethod(find_nationalities)


class PlaceRecognizer(_SpanFinder):
    """Countries and regions from a small gazetteer, and towns announced by a cue ("I'm in X")."""

    entity = "LOCATION"
    find = staticmethod(find_places)


_NAME = r"[A-Z\u00C0-\u017F][\w'\u00C0-\u017F-]+"
_NAME_CUES: tuple[tuple[re.Pattern[str], float], ...] = (
    # Mr. John Smith, ms. Tomasz, Dr Ada Lovelace
    # (lower-case titles only with their dot: "40 ms CPU" is milliseconds, not Ms. Cpu)
    (
        re.compile(
            rf"\b(?:(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|MR|MRS|MS|DR)\.?|(?i:mr|mrs|ms|mx|dr|prof)\.)"
            rf"\s+({_NAME}(?:\s+(?:[A-Z]\.?\s+)?{_NAME})?)"
        ),
        0.6,
    ),
    # my name is Klaudia, I'm called Riku Andou, her maiden name is Vinklárková, last name? Møller
    (
        re.compile(
            rf"\b(?i:(?:my|his|her|their|maiden|first|last|full) name(?: is|:|\?)|i am called|i'm called|call me)"
            rf"\s+({_NAME}(?:\s+{_NAME})?)"
        ),
        0.6,
    ),
)


class PersonCueRecognizer(_InProcess):
    """Names announced by a cue the small NER model often misses: titles and "my name is"."""

    def __init__(self) -> None:
        super().__init__(supported_entities=["PERSON"], name="PersonCueRecognizer")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        return [
            _result(self, "PERSON", m.start(1), m.end(1), score)
            for pattern, score in _NAME_CUES
            for m in pattern.finditer(text)
        ]


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer, validating domains against the bundled public suffix list.

    tldextract's module-level extractor fetches the list from the internet on first use; ours
    never does (no network at run time, and a fetch would stall the first request).
    """

    _extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    def validate_result(self, pattern_text: str) -> bool:
        return self._extract(pattern_text).fqdn != ""


def custom_recognizers(specs: list[CustomRecognizer]) -> list[EntityRecognizer]:
    """One presidio PatternRecognizer per YAML entry (regex patterns with context, deny list)."""
    out: list[EntityRecognizer] = []
    for spec in specs:
        patterns = [
            Pattern(name=p.name or f"{spec.entity.lower()}_{i}", regex=p.regex, score=p.score)
            for i, p in enumerate(spec.patterns)
        ]
        # None (presidio's own default, typed as a list in its signature) where the YAML gives none
        optional: dict[str, Any] = {"patterns": patterns or None, "deny_list": list(spec.deny_list) or None,
                                    "context": list(spec.context) or None}
        out.append(
            PatternRecognizer(
                supported_entity=spec.entity,
                name=f"custom:{spec.entity}",
                deny_list_score=spec.deny_list_score,
                **optional,
            )
        )
    return out
