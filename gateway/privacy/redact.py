"""Redaction: a new request body in which every detected value is replaced, everywhere.

Each detected value gets one placeholder (or surrogate) from the vault; then every text the
request would send out is rewritten with *all* the vault's values, so a value found once (say, a
name in the latest message) is also replaced where the analyzer missed it (the same name in an
older turn), and a conversation-scoped vault keeps earlier turns' values replaced too.
"""

from __future__ import annotations

from typing import Any

from gateway.features import SENSITIVITY_LEVELS, Entity, SensitivityFinding, level_rank
from gateway.privacy.config import PrivacyConfig
from gateway.privacy.vault import Vault
from gateway.privacy.walk import Seam, map_text, seams

_MIN_VALUE_CHARS = 2  # a one-character "value" would shred the text
_GLUED_CHARS = 4  # see _glued


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
    for entity in sorted(_across_parts_only(body, finding.entities), key=lambda e: len(e.text), reverse=True):
        value = entity.text.strip()
        if len(value) >= _MIN_VALUE_CHARS and level_rank(SENSITIVITY_LEVELS, entity.level) >= floor:
            vault.replacement_for(entity.type, value)
    # Participant names are personal by nature and too short for NER: always pseudonymised.
    return map_text(body, vault.redact_text, name_fn=vault.pseudonym_for_name, parts_fn=vault.redact_parts)


def _across_parts_only(body: dict[str, Any], entities: tuple[Entity, ...]) -> list[Entity]:
    """The findings, less those of a seam (two text parts read as one) that are not about the
    seam: one inside a single part was found in that part already, and one that merely glues
    the next part's first word onto a value the part yields whole ("…token" + "and the DB")
    would register a longer value and eat that word."""
    by_location = {s.location: s for s in seams(body)}
    if not by_location:
        return list(entities)
    ends = {(e.location, e.type, e.start, e.end) for e in entities}
    kept = []
    for e in entities:
        seam = by_location.get(e.location)
        if seam is None or (e.start < seam.split < e.end and not _glued(seam, e, ends)):
            kept.append(e)
    return kept


def _glued(seam: Seam, e: Entity, ends: set[tuple[str, str, int, int]]) -> bool:
    # Glued: one part yields the value whole up to the boundary, and the seam adds at most a
    # short word of the other part. Were it really a token cut there, those few characters of
    # it would be all that stays in clear; anything longer is taken as the token's other half.
    left_len = seam.offset + seam.split
    whole_left = (seam.left, e.type, seam.offset + e.start, left_len) in ends
    whole_right = (seam.right, e.type, 0, e.end - seam.split) in ends
    return (whole_left and e.end - seam.split <= _GLUED_CHARS) or (whole_right and seam.split - e.start <= _GLUED_CHARS)
