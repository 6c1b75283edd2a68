"""The credential table: every format's specimens are found whole, its near-miss is not.

Specimens are generated from the table (prefix + a seeded random body of the declared alphabet
and length, checksums computed), never committed: the repository holds no token a scanner
would flag.
"""

from __future__ import annotations

import random
import re

import pytest
from presidio_analyzer import RecognizerResult

from gateway.classify.sensitivity import PresidioSensitivityClassifier, _drop_overlaps
from gateway.features import SensitivityFinding
from gateway.privacy.credentials import CREDENTIAL_FORMATS, CredentialFormat, Run, checksum_ok
from gateway.privacy.overlaps import by_priority
from tests.privacy.bodies import user

SECRET_TYPES = {f.entity for f in CREDENTIAL_FORMATS}
FORMATS = {f.name: f for f in CREDENTIAL_FORMATS}


def specimens(fmt: CredentialFormat, seed: int = 16) -> list[tuple[str, tuple[str, ...]]]:
    return fmt.specimens(random.Random(f"{fmt.name}-{seed}"))


def covered(finding: SensitivityFinding, value: str) -> bool:
    """Some secret-typed finding holds the whole value."""
    return any(e.type in SECRET_TYPES and value in e.text for e in finding.entities)


def test_the_table_has_every_format_the_issue_names() -> None:
    assert {
        "github_classic", "github_fine_grained", "gitlab", "slack_bot", "slack_user", "slack_app", "slack_webhook",
        "stripe_secret", "stripe_restricted", "stripe_webhook", "openai", "anthropic", "google_api_key",
        "google_oauth_client_secret", "aws_access_key_id", "aws_secret_access_key", "azure_storage_key",
        "twilio_api_key", "sendgrid", "npm", "pypi", "huggingface", "dockerhub", "jwt", "pem_private_key",
        "url_basic_auth", "db_connection_url", "db_connection_keyvalue", "generic_assignment",
    } <= set(FORMATS)
    assert len({f.name for f in CREDENTIAL_FORMATS}) == len(CREDENTIAL_FORMATS)


@pytest.mark.parametrize("fmt", CREDENTIAL_FORMATS, ids=lambda f: f.name)
def test_specimens_have_the_declared_shape(fmt: CredentialFormat) -> None:
    for text, values in specimens(fmt):
        assert values and all(v in text for v in values)
        if fmt.build is None:
            assert re.fullmatch(fmt.pattern(), text, fmt.flags), text[:12]
        if fmt.checksum is not None:
            assert checksum_ok(fmt, text)


def test_github_checksum_is_crc32_in_base62() -> None:
    fmt = FORMATS["github_classic"]
    token = specimens(fmt)[0][0]
    assert len(token) == 40 and checksum_ok(fmt, token)
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert not checksum_ok(fmt, wrong)
    body = Run("A-Za-z0-9", 30).draw(random.Random(3))
    assert not checksum_ok(fmt, "ghp_" + body + "000000")


@pytest.mark.parametrize("fmt", CREDENTIAL_FORMATS, ids=lambda f: f.name)
def test_every_specimen_is_found_whole(classifier: PresidioSensitivityClassifier, fmt: CredentialFormat) -> None:
    for text, values in specimens(fmt):
        f = classifier.classify(user(f"Can you check why this fails?\n{text}\nIt worked yesterday."))
        for value in values:
            assert covered(f, value), (fmt.name, value[:8])
        assert f.level == "high"
        if fmt.build is None:  # a bare token: exactly one finding, the token itself
            assert [(e.type, e.text) for e in f.entities] == [(fmt.entity, text)]


@pytest.mark.parametrize("fmt", CREDENTIAL_FORMATS, ids=lambda f: f.name)
def test_near_miss_is_not_a_secret(classifier: PresidioSensitivityClassifier, fmt: CredentialFormat) -> None:
    f = classifier.classify(user(fmt.near_miss))
    assert not [e.type for e in f.entities if e.type in SECRET_TYPES | {"CREDIT_CARD"}], fmt.name


@pytest.mark.parametrize(
    ("entity", "token"),
    [
        ("API_KEY", "ghp_" + "x" * 36),  # no valid checksum, one character: still a GitHub token
        ("AWS_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLE"),  # AWS's documented example
        ("API_KEY", "sk_live_" + "0" * 24),
        ("API_KEY", "xoxb-000000000000-0000000000000-EXAMPLEEXAMPLEEXAMPLE000"),
        ("API_KEY", "sk-" + "a" * 48),
    ],
    ids=["ghp-xxx", "aws-example", "stripe-zeros", "slack-example", "openai-aaa"],
)
def test_example_looking_tokens_are_still_secrets(
    classifier: PresidioSensitivityClassifier, entity: str, token: str
) -> None:
    f = classifier.classify(user(f"export TOKEN_VALUE {token}"))
    assert [(e.type, e.text) for e in f.entities] == [(entity, token)]


def test_a_valid_checksum_scores_higher(classifier: PresidioSensitivityClassifier) -> None:
    token = specimens(FORMATS["github_classic"])[0][0]
    bad = token[:-6] + "zzzzzz"
    scores = {e.text: e.score for e in classifier.classify(user(f"a {token} b {bad}")).entities}
    assert scores == {token: 1.0, bad: 0.95}


@pytest.mark.parametrize(
    "text",
    [
        "password: ${DB_PASSWORD} comes from the environment",
        "api_key = os.environ['OPENAI_API_KEY']",
        "token = settings.GITHUB_TOKEN",
        "postgres://app:${PGPASSWORD}@db.internal/app",
        "The access token: generated by the server on login.",
        "Use git commit -m and then the secret = keeping commits small.",
        "sk-learn-compatible-estimators wrap any model",
        "Authorization: Bearer <token>",
        "connection strings of the `Server=…;Password=…` form",
    ],
)
def test_references_and_prose_are_not_secrets(classifier: PresidioSensitivityClassifier, text: str) -> None:
    f = classifier.classify(user(text))
    assert not [e.type for e in f.entities if e.type in SECRET_TYPES], text


def test_generic_assignment_needs_a_random_value_unless_it_is_a_password(
    classifier: PresidioSensitivityClassifier,
) -> None:
    value = Run("A-Za-z0-9", 24).draw(random.Random(5))
    found = {e.text for e in classifier.classify(user(f"token: {value}\nkey=lambda_name\npassword=hunter22")).entities}
    assert value in found and "hunter22" in found and "lambda_name" not in found


def test_aws_secret_key_needs_aws_nearby(classifier: PresidioSensitivityClassifier) -> None:
    text, (key_id, secret) = specimens(FORMATS["aws_secret_access_key"])[0]
    assert covered(classifier.classify(user(text)), secret)
    alone = classifier.classify(user(f"the checksum column holds {secret} for that row"))
    assert not covered(alone, secret)
    sha = "3f786850e387550fdab836ed7e6dc881de23001b"  # a git SHA-1 next to a key id: not a secret key
    assert not covered(classifier.classify(user(f"{key_id} was rotated in commit {sha}")), sha)


def test_truncated_and_split_pem_halves_are_found(classifier: PresidioSensitivityClassifier) -> None:
    block, *_ = specimens(FORMATS["pem_private_key"])[0][1]
    lines = block.splitlines()
    first, second = "\n".join(lines[:5]), "\n".join(lines[5:])
    for half in (first, second):
        f = classifier.classify(user(f"part of my key:\n{half}\nwhat is wrong?"))
        assert [(e.type, e.text) for e in f.entities if e.type in SECRET_TYPES] == [("PRIVATE_KEY", half)]


# -- overlaps: the secret's whole span wins -----------------------------------------------------


def _r(entity: str, start: int, end: int, score: float) -> RecognizerResult:
    return RecognizerResult(entity, start, end, score)


def test_a_fragment_inside_a_token_never_outranks_the_token() -> None:
    text = "key ghp_ab1234567cdefghijklmnopqrstuvwxyz0123456 end"
    token = (4, 44)
    fragment = _r("MEDICAL_LICENSE", 9, 18, 1.0)  # scores above the secret: the old ranking kept it
    out = by_priority(text, [fragment, _r("API_KEY", *token, 0.95)], {"API_KEY"})
    assert [(r.entity_type, r.start, r.end) for r in out] == [("API_KEY", *token)]
    raws = [(r.entity_type, r.start, r.end, r.score) for r in out]
    assert _drop_overlaps(raws, lambda _: 3) == [("API_KEY", *token, 0.95)]


def test_a_block_around_a_secret_keeps_its_parts_outside_it() -> None:
    text = "12 Main Street sk_live_abcdefghijklmnopqrstuvwx Springfield"
    secret = (15, 47)
    out = by_priority(text, [_r("STREET_ADDRESS", 0, len(text), 0.9), _r("API_KEY", *secret, 0.95)], {"API_KEY"})
    spans = sorted((r.entity_type, text[r.start : r.end]) for r in out)
    assert spans == [("API_KEY", text[15:47]), ("STREET_ADDRESS", "12 Main Street"), ("STREET_ADDRESS", "Springfield")]


def test_a_card_beats_a_phone_number_over_the_same_digits() -> None:
    text = "call 4111 1111 1111 1111"
    out = by_priority(text, [_r("PHONE_NUMBER", 5, 19, 0.75), _r("CREDIT_CARD", 5, 24, 0.9)], {"API_KEY"})
    assert [(r.entity_type, r.start, r.end) for r in out] == [("CREDIT_CARD", 5, 24)]


def test_custom_recognizer_inside_a_token_leaves_the_token_whole() -> None:
    from gateway.classify.sensitivity import build_sensitivity_classifier
    from gateway.privacy.config import PrivacyConfig

    cfg = PrivacyConfig.model_validate({
        "nlp_model": "none",
        "recognizers": [{"entity": "TICKET", "level": "high", "patterns": [{"regex": "[A-Z]{2}\\d{7}", "score": 1.0}]}],
    })
    c = build_sensitivity_classifier(cfg)
    assert isinstance(c, PresidioSensitivityClassifier)
    token = "sk_live_" + "QZ1234567" + Run("A-Za-z0-9", 16).draw(random.Random(9))
    f = c.classify(user(f"use {token} and ticket AB7654321"))
    assert {(e.type, e.text) for e in f.entities} == {("API_KEY", token), ("TICKET", "AB7654321")}


def test_label_rows_tried_at_identifier_starts_find_what_a_full_scan_finds() -> None:
    from gateway.privacy.recognizers import _anchored

    fmt = FORMATS["generic_assignment"]
    rx = re.compile(fmt.pattern(), fmt.flags)
    rng = random.Random(11)
    pieces = ["API_TOKEN", "db.password", "key", "my-secret_key", "Token", "passwd", "keys", "monkey", "x_pwd",
              "=", ": ", " = ", '"', "'", '\\"', " ", "\n", ",", "the", "value", "hunter22", "Ab3dE6gH9jK2mN5pQ8",
              "${X}", "a.b.c.d.e.f.g.h_token", "İstanbul"]
    hits = 0
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        lowered = text.lower()
        if len(lowered) != len(text):
            continue  # the recognizer scans such texts in full
        want = [m.span() for m in rx.finditer(text)]
        assert [m.span() for m in _anchored(rx, text, lowered, fmt.anchors)] == want, text
        hits += len(want)
    assert hits > 100


def test_a_long_base64_blob_near_a_pem_mention_is_scanned_in_linear_time() -> None:
    import base64
    import time

    from gateway.privacy.recognizers import SecretRecognizer

    blob = base64.b64encode(random.Random(2).randbytes(48 * 400)).decode()
    text = "my PRIVATE KEY question\n" + "\n".join(blob[i : i + 64] for i in range(0, len(blob), 64))
    rec = SecretRecognizer()
    start = time.perf_counter()
    assert rec.analyze(text, list(rec.supported_entities)) == []
    # Backtracking over the two ways a line can match was exponential in the lines (hung).
    assert time.perf_counter() - start < 2.0
