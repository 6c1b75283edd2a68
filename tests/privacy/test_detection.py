"""Detection: built-in and custom recognizers, allow-lists, thresholds, levels, what is scanned."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from gateway.classify.sensitivity import PresidioSensitivityClassifier, build_sensitivity_classifier
from gateway.features import SensitivityFinding
from gateway.privacy.config import PrivacyConfig
from gateway.privacy.engine import PrivacyStartupError
from tests.privacy.bodies import PLANTED, every_shape, user


def found(finding: SensitivityFinding) -> set[tuple[str, str]]:
    return {(e.type, e.text) for e in finding.entities}


SECRETS = [
    ("API_KEY", "sk-proj-Q7w8E9r0T1y2U3i4O5p6A7s8D9f0G1h2", "my key is {} ok"),
    ("API_KEY", "sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345", "anthropic: {}"),
    ("API_KEY", "ghp_4Ab9Cd8Ef7Gh6Ij5Kl4Mn3Op2Qr1St0Uv9Wx", "push with {}"),
    ("API_KEY", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", "token {}"),
    ("API_KEY", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "slack bot {}"),
    ("API_KEY", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "maps key {}"),
    ("API_KEY", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe {}"),
    ("AWS_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLQ", "aws id {}"),
    (
        "JWT",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "Authorization: Bearer {}",
    ),
    ("PASSWORD", "s3cr3t-Passw0rd", "connect to https://deploy:{}@git.example.com/repo.git"),
    ("SECRET", "hunter2hunter2", 'config: password = "{}"'),
]


@pytest.mark.parametrize(("entity", "value", "template"), SECRETS, ids=[f"{e}-{v[:6]}" for e, v, _ in SECRETS])
def test_secret_recognizers_find_exactly_the_secret(
    classifier: PresidioSensitivityClassifier, entity: str, value: str, template: str
) -> None:
    f = classifier.classify(user(template.format(value)))
    assert (entity, value) in found(f)
    assert f.level == "high"


def test_pem_private_key_is_one_high_entity(classifier: PresidioSensitivityClassifier) -> None:
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn\n/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n-----END RSA PRIVATE KEY-----"
    f = classifier.classify(user(f"here is the key:\n{pem}\nthanks"))
    assert ("PRIVATE_KEY", pem) in found(f)


@pytest.mark.parametrize(
    "text",
    [
        "the sk- prefix alone is not a key, nor is sk-short",
        "password: <PASSWORD_1> is a placeholder already",
        "set token=${GITHUB_TOKEN} in the workflow",
    ],
)
def test_secret_lookalikes_are_not_secrets(classifier: PresidioSensitivityClassifier, text: str) -> None:
    f = classifier.classify(user(text))
    assert not {e.type for e in f.entities} & {"API_KEY", "PASSWORD", "SECRET"}


def test_builtin_pii_and_their_levels(classifier: PresidioSensitivityClassifier) -> None:
    p = PLANTED
    text = (
        f"{p['person']} ({p['email']}, {p['phone']}) paid with {p['card']}; SSN {p['ssn']}, "
        f"IBAN {p['iban']}, from {p['ip']}."
    )
    f = classifier.classify(user(text))
    got = found(f)
    for entity, key in [
        ("PERSON", "person"),
        ("EMAIL_ADDRESS", "email"),
        ("PHONE_NUMBER", "phone"),
        ("CREDIT_CARD", "card"),
        ("US_SSN", "ssn"),
        ("IBAN_CODE", "iban"),
        ("IP_ADDRESS", "ip"),
    ]:
        assert (entity, p[key]) in got, entity
    levels = {e.type: e.level for e in f.entities}
    assert levels["CREDIT_CARD"] == levels["US_SSN"] == levels["IBAN_CODE"] == "high"
    assert levels["PERSON"] == levels["EMAIL_ADDRESS"] == "medium"
    assert f.level == "high"
    assert f.evidence["counts"]["PERSON"] == 1
    assert "Margaret" not in repr(f)  # Entity.text is kept out of reprs


def test_request_level_is_the_highest_found(classifier: PresidioSensitivityClassifier) -> None:
    assert classifier.classify(user("What is the capital of France?")).level in ("none", "low")
    assert classifier.classify(user("Please email margaret.thornton@example.org")).level == "medium"
    assert classifier.classify(user("Write a haiku about autumn leaves.")).level == "none"


def test_every_location_is_scanned(classifier: PresidioSensitivityClassifier) -> None:
    f = classifier.classify(every_shape())
    locations = {(e.location, e.text) for e in f.entities}
    expected = {
        ("/messages/0/content", PLANTED["openai_key"]),
        ("/messages/1/content", PLANTED["card"]),
        ("/messages/2/tool_calls/0/function/arguments/email", PLANTED["email"]),
        ("/messages/2/tool_calls/0/function/arguments/ssn", PLANTED["ssn"]),
        ("/messages/2/tool_calls/0/function/arguments/note", PLANTED["ip"]),
        ("/messages/3/content", PLANTED["iban"]),
        ("/messages/5/content/0/text", PLANTED["github"]),
        ("/messages/5/content/1/text", PLANTED["db_password"]),
        ("/tools/0/function/description", PLANTED["tool_person"]),
        ("/tools/0/function/parameters/properties/email/description", PLANTED["tool_email"]),
    }
    assert expected <= locations, expected - locations
    seg = next(e for e in f.entities if e.location == "/messages/1/content" and e.type == "CREDIT_CARD")
    assert every_shape()["messages"][1]["content"][seg.start : seg.end] == PLANTED["card"]


def test_non_text_parts_are_unscanned_and_graded_by_policy(
    classifier: PresidioSensitivityClassifier, custom_classifier: PresidioSensitivityClassifier
) -> None:
    body = {
        "model": "auto",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is in this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ],
            }
        ],
    }
    f = classifier.classify(body)
    assert f.unscanned == ("/messages/0/content/1", "/messages/0/content/2")
    assert f.level == "high"  # default unscanned_level
    assert custom_classifier.classify(body).level == "low"  # policy says unscanned_level: low


def test_custom_deny_list(custom_classifier: PresidioSensitivityClassifier) -> None:
    f = custom_classifier.classify(user("Status of project nightjar and BLUEBIRD? Not bluebirds."))
    assert {(e.type, e.text) for e in f.entities} == {("PROJECT_CODE", "nightjar"), ("PROJECT_CODE", "BLUEBIRD")}
    assert f.level == "high"


def test_custom_regex_needs_its_context_word(custom_classifier: PresidioSensitivityClassifier) -> None:
    # score 0.3 is under the 0.4 threshold; a context word nearby lifts it over.
    with_ctx = custom_classifier.classify(user("Refund customer CUST-004211 today."))
    without = custom_classifier.classify(user("Ticket CUST-004211 was filed."))
    assert ("CUSTOMER_ID", "CUST-004211") in found(with_ctx)
    assert with_ctx.level == "medium"
    assert not without.entities


def test_allow_list_is_per_entity(custom_classifier: PresidioSensitivityClassifier) -> None:
    f = custom_classifier.classify(user("Write to support@example.com or to ops.lead@example.com"))
    assert found(f) == {("EMAIL_ADDRESS", "ops.lead@example.com")}


def test_per_entity_score_threshold(
    classifier: PresidioSensitivityClassifier, custom_classifier: PresidioSensitivityClassifier
) -> None:
    bare = user("reach me at 4155552671 after 5")  # valid US number, no separators: score 0.5
    assert ("PHONE_NUMBER", "4155552671") in found(classifier.classify(bare))
    assert not custom_classifier.classify(bare).entities  # PHONE_NUMBER threshold 0.6
    formatted = custom_classifier.classify(user("reach me at +1 415-555-2671"))
    assert ("PHONE_NUMBER", "+1 415-555-2671") in found(formatted)


def test_level_none_turns_an_entity_off() -> None:
    c = build_sensitivity_classifier(PrivacyConfig(nlp_model="none", levels={"EMAIL_ADDRESS": "none"}))
    assert isinstance(c, PresidioSensitivityClassifier)
    assert "EMAIL_ADDRESS" not in c.entities
    f = c.classify(user("mail a.b@example.com, card 4111 1111 1111 1111"))
    assert {e.type for e in f.entities} == {"CREDIT_CARD"}


def test_missing_model_is_a_clear_startup_error() -> None:
    with pytest.raises(PrivacyStartupError, match=r"en_core_web_nonexistent.*not installed.*nlp_model: none"):
        build_sensitivity_classifier(PrivacyConfig(nlp_model="en_core_web_nonexistent"))


def test_config_defaults_and_validation() -> None:
    assert PrivacyConfig.model_validate({}) == PrivacyConfig()
    with pytest.raises(ValidationError, match="invalid regular expression"):
        PrivacyConfig.model_validate({"recognizers": [{"entity": "X", "patterns": [{"regex": "(unclosed"}]}]})
    with pytest.raises(ValidationError, match="needs `patterns` and/or `deny_list`"):
        PrivacyConfig.model_validate({"recognizers": [{"entity": "X"}]})
    with pytest.raises(ValidationError):
        PrivacyConfig.model_validate({"levels": {"EMAIL_ADDRESS": "critical"}})
    with pytest.raises(ValidationError):
        PrivacyConfig.model_validate({"recognizers": [{"entity": "lower-case", "deny_list": ["a"]}]})
    with pytest.raises(ValidationError):
        PrivacyConfig.model_validate({"unknown_key": 1})
    assert PrivacyConfig(levels={"PERSON": "high"}).level_of("PERSON") == "high"
    assert PrivacyConfig().level_of("CREDIT_CARD") == "high"


def test_analysis_failure_fails_closed_without_leaking(
    custom_cfg: PrivacyConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    c = build_sensitivity_classifier(custom_cfg)
    assert isinstance(c, PresidioSensitivityClassifier)

    def broken(text: str, **_: object) -> list:
        raise ValueError(f"Did not find word '{text}'")  # presidio quotes the text in its errors

    monkeypatch.setattr(c._analyzer, "analyze", broken)
    f = c.classify(user("secret project Bluebird for customer CUST-000001"))
    assert f.error is not None and f.level == "high"
    assert "Bluebird" not in f.error and "CUST" not in f.error
    assert "Bluebird" not in caplog.text


def test_over_budget_is_an_error() -> None:
    c = build_sensitivity_classifier(PrivacyConfig(nlp_model="none", analysis_budget_ms=0.001, cache_size=0))
    f = c.classify(user("card 4111 1111 1111 1111"))
    assert f.error is not None and "budget" in f.error and f.level == "high"


def test_resent_history_comes_from_the_cache(custom_classifier: PresidioSensitivityClassifier) -> None:
    body = user("Project Nightjar update for turn one")
    first = custom_classifier.classify(body)
    body["messages"].append({"role": "user", "content": "and now Bluebird"})
    second = custom_classifier.classify(body)
    assert first.evidence["cached_segments"] == 0
    assert second.evidence["cached_segments"] == 1
    assert {e.text for e in second.entities} == {"Nightjar", "Bluebird"}


def test_concurrent_classify_matches_sequential(classifier: PresidioSensitivityClassifier) -> None:
    bodies = [user(f"Agent {i}: mail user{i}@example.com, card 4111 1111 1111 1111, host 10.0.0.{i}") for i in range(12)]
    expected = [found(classifier.classify(b)) for b in bodies]
    results: list[set[tuple[str, str]] | None] = [None] * len(bodies)

    def work(i: int) -> None:
        results[i] = found(classifier.classify(bodies[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_disabled_privacy_scans_nothing() -> None:
    c = build_sensitivity_classifier(PrivacyConfig(enabled=False))
    assert c.classify(user("card 4111 1111 1111 1111")).level == "none"


@pytest.mark.parametrize(
    "card",
    [
        "4841241182449353489",  # 19-digit Visa: presidio's own pattern misses it
        "2223 0031 2200 3222",  # Mastercard 2-series
        "3782 822463 10005",  # Amex
    ],
)
def test_card_numbers_by_issuer_and_luhn(custom_classifier: PresidioSensitivityClassifier, card: str) -> None:
    f = custom_classifier.classify(user(f"charge {card} please"))
    assert ("CREDIT_CARD", card) in found(f)


def test_luhn_invalid_digit_runs_are_not_cards(custom_classifier: PresidioSensitivityClassifier) -> None:
    f = custom_classifier.classify(user("order 4841241182449353488 shipped"))
    assert "CREDIT_CARD" not in {e.type for e in f.entities}


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("Ship it to 4018 Oak Ridge Road tomorrow", "4018 Oak Ridge Road"),
        ("The bus station is on Via Pasquale Scura 127", "Via Pasquale Scura 127"),
        ("She lives at Rosenweg 5 in Bern", "Rosenweg 5"),
        ("mail: PSC 3412, Box 5242", "PSC 3412, Box 5242"),
        ("Floor plan for Suite 026", "Suite 026"),
    ],
)
def test_street_addresses(custom_classifier: PresidioSensitivityClassifier, text: str, address: str) -> None:
    f = custom_classifier.classify(user(text))
    assert ("STREET_ADDRESS", address) in found(f)
    assert f.level == "medium"


def test_version_numbers_are_not_addresses(custom_classifier: PresidioSensitivityClassifier) -> None:
    f = custom_classifier.classify(user("I use Windows 10 and Python 3.11; see chapter 5, table 12."))
    assert not f.entities


def test_name_cues_find_people_without_ner(custom_classifier: PresidioSensitivityClassifier) -> None:
    # custom_classifier has no NER (nlp_model: none): these come from the cue recognizer alone.
    f = custom_classifier.classify(user("Hello, my name is Klaudia Nowak. Please cc Dr. Ada Lovelace."))
    assert found(f) >= {("PERSON", "Klaudia Nowak"), ("PERSON", "Ada Lovelace")}
    assert not custom_classifier.classify(user("the name is not important")).entities
