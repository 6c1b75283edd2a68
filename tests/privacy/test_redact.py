"""Redaction of every message shape, vault consistency, isolation and TTL."""

from __future__ import annotations

import copy
import json
import pickle
import threading

import pytest

from gateway.classify.sensitivity import PresidioSensitivityClassifier
from gateway.privacy.config import PrivacyConfig
from gateway.privacy.redact import redact_body
from gateway.privacy.vault import Vault, VaultStore
from tests.privacy.bodies import PLANTED, every_shape, leaked, user


def test_every_shape_is_redacted_and_input_untouched(
    classifier: PresidioSensitivityClassifier, default_cfg: PrivacyConfig
) -> None:
    body = every_shape()
    before = copy.deepcopy(body)
    vault = Vault()
    out = redact_body(body, classifier.classify(body), vault, default_cfg)
    assert body == before  # never mutated
    assert leaked(out) == []
    assert leaked(body) != []  # the check itself can fail
    # Tool-call arguments are still valid JSON, with placeholders as values.
    args = json.loads(out["messages"][2]["tool_calls"][0]["function"]["arguments"])
    assert set(args) == {"email", "ssn", "note"}
    assert args["email"] == "<EMAIL_ADDRESS_1>"
    # A role:tool result that is JSON text stays JSON.
    assert json.loads(out["messages"][3]["content"])["owner"] == "<PERSON_1>"
    # Consistent across messages and turns: one value, one placeholder.
    assert "<EMAIL_ADDRESS_1>" in out["messages"][0]["content"]
    assert out["messages"][4]["content"] == "Thanks <PERSON_1>, I found your account."
    # The name field stays an identifier (OpenAI: [A-Za-z0-9_-]) and is pseudonymised.
    assert out["messages"][1]["name"] == "PERSON_1"
    # Structure and non-text fields are kept.
    assert out["messages"][2]["tool_calls"][0]["function"]["name"] == "lookup_customer"
    assert out["tools"][0]["function"]["name"] == "lookup_customer"
    assert len(vault) == len(PLANTED) == sum(vault.counts_by_type().values())
    assert vault.counts_by_type()["PERSON"] == 2  # Margaret Thornton, Desmond Okafor


def test_missed_occurrences_of_a_found_value_are_replaced_too(default_cfg: PrivacyConfig) -> None:
    from gateway.features import Entity, SensitivityFinding

    # The analyzer found the name in one message only; it must go everywhere.
    body = {
        "messages": [
            {"role": "user", "content": "Zanzibar Quill asked"},
            {"role": "assistant", "content": "Quill? Zanzibar Quill's order shipped."},
        ]
    }
    e = Entity("PERSON", "/messages/0/content", 0, 14, 0.85, "medium", "Zanzibar Quill")
    out = redact_body(body, SensitivityFinding("medium", (e,)), Vault(), default_cfg)
    assert out["messages"][1]["content"] == "Quill? <PERSON_1>'s order shipped."


def test_redact_at_least_keeps_lower_levels(classifier: PresidioSensitivityClassifier) -> None:
    cfg = PrivacyConfig(redact_at_least="high")
    body = user(f"{PLANTED['person']} paid with {PLANTED['card']}")
    out = redact_body(body, classifier.classify(body), Vault(), cfg)
    assert out["messages"][0]["content"] == f"{PLANTED['person']} paid with <CREDIT_CARD_1>"


def test_surrogate_mode_round_trip(classifier: PresidioSensitivityClassifier) -> None:
    cfg = PrivacyConfig(mode="surrogate")
    body = every_shape()
    vault = Vault()
    out = redact_body(body, classifier.classify(body), vault, cfg)
    assert leaked(out) == []
    assert "<" not in out["messages"][1]["content"]  # no placeholders in this mode
    args = json.loads(out["messages"][2]["tool_calls"][0]["function"]["arguments"])
    assert args["email"].endswith("@example.com")
    surrogate_email = args["email"]
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"Mail sent to {surrogate_email}."}}]}
    assert vault.restore_completion(reply)["choices"][0]["message"]["content"] == f"Mail sent to {PLANTED['email']}."


def test_vault_never_shows_values() -> None:
    v = Vault()
    v.replacement_for("PERSON", "Margaret Thornton")
    assert "Margaret" not in repr(v) and "Margaret" not in str(v) and "Margaret" not in f"{v}"
    assert repr(v).startswith("Vault(") and "PERSON" in repr(v)
    with pytest.raises(TypeError):
        pickle.dumps(v)
    assert len(v) == 1
    assert v.replacement_for("PERSON", "Margaret Thornton") == "<PERSON_1>"
    assert v.replacement_for("PERSON", "Desmond Okafor") == "<PERSON_2>"
    assert v.counts_by_type() == {"PERSON": 2}


def test_conversation_vaults_persist_isolate_and_expire() -> None:
    now = [1000.0]
    store = VaultStore(ttl_s=60, clock=lambda: now[0])
    a1 = store.get("conv-a")
    a1.replacement_for("PERSON", "Margaret Thornton")
    now[0] += 30
    assert store.get("conv-a") is a1  # same conversation, same placeholders next turn
    assert store.get("conv-b") is not a1
    assert store.get(None) is not store.get(None)  # no id: a fresh vault per request
    now[0] += 59  # 59 s after the last use of conv-a: still alive
    assert store.get("conv-a").replacement_for("PERSON", "Margaret Thornton") == "<PERSON_1>"
    now[0] += 61
    fresh = store.get("conv-a")
    assert fresh is not a1 and len(fresh) == 0
    assert len(store) == 1  # conv-b expired as well


def test_conversation_vault_gives_same_placeholder_across_turns(
    classifier: PresidioSensitivityClassifier, default_cfg: PrivacyConfig
) -> None:
    store = VaultStore(ttl_s=600)
    turn1 = user(f"I'm {PLANTED['person']}, mail {PLANTED['email']}")
    out1 = redact_body(turn1, classifier.classify(turn1), store.get("c1"), default_cfg)
    turn2 = user(f"Write to {PLANTED['email']} again please")
    out2 = redact_body(turn2, classifier.classify(turn2), store.get("c1"), default_cfg)
    email_ph = out1["messages"][0]["content"].split("mail ")[1]
    assert email_ph == "<EMAIL_ADDRESS_1>"
    assert out2["messages"][0]["content"] == "Write to <EMAIL_ADDRESS_1> again please"


def test_concurrent_requests_never_share_values(
    classifier: PresidioSensitivityClassifier, default_cfg: PrivacyConfig
) -> None:
    store = VaultStore(ttl_s=60)
    n = 12
    restored: list[str | None] = [None] * n

    def one(i: int) -> None:
        email = f"agent.number{i}@example.org"
        body = user(f"Please forward this to {email} today")
        vault = store.get(None)
        out = redact_body(body, classifier.classify(body), vault, default_cfg)
        text = out["messages"][0]["content"]
        assert email not in text
        echo = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        restored[i] = vault.restore_completion(echo)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert restored == [f"Please forward this to agent.number{i}@example.org today" for i in range(n)]


def test_shared_vault_is_consistent_under_concurrency() -> None:
    v = Vault()
    values = [f"value-{i}" for i in range(50)]
    got: dict[str, set[str]] = {x: set() for x in values}
    lock = threading.Lock()

    def worker() -> None:
        for x in values:
            rep = v.replacement_for("SECRET", x)
            with lock:
                got[x].add(rep)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(r) == 1 for r in got.values())
    assert len({next(iter(r)) for r in got.values()}) == 50
    assert len(v) == 50
