"""Redaction: a new request body in which every detected value is replaced, everywhere.

Each detected value gets one placeholder (or surrogate) from the vault; then every text the
request would send out is rewritten with *all* the vault's values, so a value found once (say, a
name in the latest message) is also replaced where the analyzer missed it (the same name in an
older turn), and a conversation-scoped vault keeps earlier turns' values replaced too.
"""

from __future__ import annotations

from typing import Any

from gateway.features import SENSITIVITY_LEVELS, SensitivityFinding, level_rank
from gateway.privacy.config import PrivacyConfig
from gateway.privacy.vault import Vault
from gateway.privacy.walk import map_text

_MIN_VALUE_CHARS = 2  # a one-character "value" would shred the text


def redact_body(
    body: dict[str, Any], finding: SensitivityFinding, vault: Vault, cfg: PrivacyConfig
) -> dict[str, Any]:
    """A new body (the input is never mutated) with values at or above `redact_at_least` replaced.

    Message `name` fields are always replaced by an identifier-safe pseudonym (`PERSON_3`).
    """
    if len(vault) == 0:
        vault.mode = cfg.mode
    floor = level_rank(SENSITIVITY_LEVELS, cfg.redact_at_least)
    # Longest first, so a value that contains another (an e-mail containing a name) is registered
    # under its own type before its parts.
    for entity in sorted(finding.entities, key=lambda e: len(e.text), reverse=True):
        value = entity.text.strip()
        if len(value) >= _MIN_VALUE_CHARS and level_rank(SENSITIVITY_LEVELS, entity.level) >= floor:
            vault.replacement_for(entity.type, value)
    # Participant names are personal by nature and too short for NER: always pseudonymised.
    return map_text(body, vault.redact_text, name_fn=vault.pseudonym_for_name)
