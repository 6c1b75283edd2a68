"""Recognizers we add to presidio's: secrets, a fast phone recognizer, an offline e-mail
recognizer, and the custom recognizers a policy declares.

Secrets are matched by their documented formats (prefixes, lengths, PEM armour, JWT structure)
with scores high enough to pass any sane threshold without context words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
from gateway.privacy.config import CustomRecognizer
from gateway.privacy.places import find_nationalities, find_places
from gateway.privacy.regex_gate import gate


@dataclass(frozen=True)
class SecretPattern:
    entity: str
    name: str
    regex: re.Pattern[str]
    group: int = 0  # the capture group holding the secret itself (0: the whole match)
    score: float = 0.95
    # Substrings one of which every match contains. A pattern that opens with a look-behind
    # makes `re` try it at every position of the text (~30 us per KB each); a substring search
    # first skips the pattern on the texts it cannot match, which is nearly all of them.
    needles: tuple[str, ...] = ()


_B = r"(?<![A-Za-z0-9_-])"  # start of a token: secrets are never the tail of a longer word
_E = r"(?![A-Za-z0-9_-])"

SECRET_PATTERNS: tuple[SecretPattern, ...] = (
    # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), and other sk- keys: long random tails.
    SecretPattern("API_KEY", "openai_like", re.compile(_B + r"sk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_-]{20,}" + _E),
                  needles=("sk-",)),
    SecretPattern("API_KEY", "stripe", re.compile(_B + r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}" + _E),
                  needles=("_live_", "_test_")),
    SecretPattern("API_KEY", "github", re.compile(_B + r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})" + _E),
                  needles=("gh",)),
    SecretPattern("API_KEY", "slack", re.compile(_B + r"xox[abposr]-(?:[A-Za-z0-9]+-){1,4}[A-Za-z0-9]{8,}" + _E),
                  needles=("xox",)),
    SecretPattern(
        "API_KEY", "slack_webhook", re.compile(r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+")
    ),
    SecretPattern("API_KEY", "google", re.compile(_B + r"AIza[0-9A-Za-z_-]{35}" + _E), needles=("AIza",)),
    SecretPattern("API_KEY", "huggingface", re.compile(_B + r"hf_[A-Za-z0-9]{30,}" + _E), needles=("hf_",)),
    SecretPattern("AWS_ACCESS_KEY", "aws_key_id", re.compile(_B + r"(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}" + _E),
                  needles=("AKIA", "ASIA", "AGPA", "AIDA", "AROA")),
    SecretPattern(
        "PRIVATE_KEY",
        "pem",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
            re.DOTALL,
        ),
        score=1.0,
    ),
    # header.payload.signature, the first two being base64url JSON objects ("eyJ" = '{"').
    SecretPattern("JWT", "jwt", re.compile(_B + r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}" + _E),
                  needles=("eyJ",)),
    # scheme://user:password@host: only the password is the secret.
    SecretPattern(
        "PASSWORD", "url_password", re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:([^\s/@]{1,256})@[^\s/]"), group=1,
        needles=("://",),
    ),
    # password = "...", api_key: ..., token=... in configs, env files and logs.
    SecretPattern(
        "SECRET",
        "assignment",
        re.compile(
            r"(?i)\b(?:password|passwd|pwd|pass|secret|client_secret|token|access_token|auth_token|api[_-]?key|"
            r"secret[_-]?key|access[_-]?key|aws_secret_access_key|private[_-]?key)\b[\"']?\s*[:=]\s*[\"']?"
            r"([^\s\"',;]{6,})"
        ),
        group=1,
        score=0.85,
    ),
)


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
    """Credentials by their known formats. Reported span = the secret only, not its label."""

    def __init__(self, patterns: tuple[SecretPattern, ...] = SECRET_PATTERNS) -> None:
        self._patterns = patterns
        super().__init__(supported_entities=sorted({p.entity for p in patterns}), name="SecretRecognizer")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        out: list[RecognizerResult] = []
        for p in self._patterns:
            if p.entity not in entities or (p.needles and not any(n in text for n in p.needles)):
                continue
            for m in p.regex.finditer(text):
                start, end = m.span(p.group)
                if p.entity == "SECRET" and _looks_like_placeholder(text[start:end]):
                    continue
                out.append(_result(self, p.entity, start, end, p.score))
        return out


def _result(rec: EntityRecognizer, entity: str, start: int, end: int, score: float) -> RecognizerResult:
    # presidio's context enhancer expects an explanation on every result.
    return RecognizerResult(
        entity,
        start,
        end,
        score,
        analysis_explanation=AnalysisExplanation(recognizer=rec.name, original_score=score),
        recognition_metadata={
            RecognizerResult.RECOGNIZER_NAME_KEY: rec.name,
            RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: rec.id,
        },
    )


def _looks_like_placeholder(value: str) -> bool:
    # `password: <PASSWORD_1>` or `token=${TOKEN}` is not a secret to redact again.
    return value.startswith(("<", "${", "{{", "$"))


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


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_CARD_CANDIDATE = gate(re.compile(r"(?<![\d-])(?:\d[ -]?){11,18}\d(?![\d-])"))
# Issuer prefixes (IIN ranges): Visa 4, Mastercard 51-55 and 2221-2720, Amex 34/37, Diners 30/36/38,
# Discover/UnionPay 6, JCB 35 (and its 15-digit 2131/1800), Maestro 50/56-69.
_IIN = re.compile(r"^(?:4|5[0-9]|2(?:2[2-9][1-9]|[3-6]\d\d|7[01]\d|720)|3[0-8]|6|2131|1800)")


class CardNumberRecognizer(_InProcess):
    """Card numbers of 12-19 digits with a known issuer prefix and a valid Luhn checksum.

    Complements presidio's CreditCardRecognizer, whose patterns miss 19-digit Visa and the
    Mastercard 2-series (2221-2720).
    """

    CONTEXT = ["credit", "card", "visa", "mastercard", "cc", "amex", "debit", "payment"]

    def __init__(self) -> None:
        super().__init__(supported_entities=["CREDIT_CARD"], context=self.CONTEXT, name="CardNumberRecognizer")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        out = []
        for m in _CARD_CANDIDATE.finditer(text):
            digits = re.sub(r"\D", "", m.group(0))
            if 12 <= len(digits) <= 19 and _IIN.match(digits) and luhn_ok(digits) and len(set(digits)) > 2:
                out.append(_result(self, "CREDIT_CARD", m.start(), m.end(), 0.9 if len(digits) >= 15 else 0.6))
        return out


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
        out.append(
            PatternRecognizer(
                supported_entity=spec.entity,
                name=f"custom:{spec.entity}",
                patterns=patterns or None,
                deny_list=list(spec.deny_list) or None,
                context=list(spec.context) or None,
                deny_list_score=spec.deny_list_score,
            )
        )
    return out
