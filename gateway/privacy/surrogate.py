"""Realistic stand-ins for redacted values (`mode: surrogate`).

Surrogates come from reserved or fictional ranges (example.com, 555-01xx, TEST-NET IPs, Luhn-valid
test card ranges) so a surrogate can never be someone's real data, and they are distinctive
enough to find again in the model's answer. Nothing about a surrogate is derived from the value
it replaces.
"""

from __future__ import annotations

import random
import string

from gateway.privacy.cards import luhn_complete

_FIRST = ("Avery", "Jordan", "Morgan", "Riley", "Quinn", "Rowan", "Emerson", "Harper", "Sawyer", "Finley",
          "Marlowe", "Ellis", "Hollis", "Linden", "Sutton", "Tatum", "Wren", "Arden", "Blair", "Carys")
_LAST = ("Ashdown", "Birchwood", "Calloway", "Dunmore", "Everly", "Fairholt", "Greaves", "Hartwell",
         "Ingleby", "Jessop", "Kettering", "Langridge", "Merriweather", "Northcott", "Oakhurst",
         "Pemberton", "Quenby", "Rushworth", "Stanbridge", "Thistlewood")
_PLACES = ("Eastbrook", "Millbridge", "Northwick", "Oakvale", "Pinehurst", "Redford Falls", "Stonemere",
           "Westhaven", "Ashby Cross", "Larkspur Bay")


def _token(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def make_surrogate(entity_type: str, n: int, rng: random.Random) -> str:
    """The n-th surrogate of a type in one vault; `rng` is the vault's own random stream."""
    first, last = _FIRST[rng.randrange(len(_FIRST))], _LAST[rng.randrange(len(_LAST))]
    if entity_type == "PERSON":
        return f"{first} {last}"
    if entity_type == "EMAIL_ADDRESS":
        return f"{first.lower()}.{last.lower()}{n}@example.com"
    if entity_type == "PHONE_NUMBER":
        return f"+1 202-555-01{n % 100:02d}"
    if entity_type == "CREDIT_CARD":
        return luhn_complete(f"400000{rng.randrange(10**9):09d}")
    if entity_type == "US_SSN":
        return f"900-{rng.randrange(70, 99):02d}-{rng.randrange(10**4):04d}"  # 9xx: never issued as an SSN
    if entity_type == "IP_ADDRESS":
        return f"192.0.2.{n % 254 + 1}"  # TEST-NET-1, RFC 5737
    if entity_type == "IBAN_CODE":
        return f"XX00TEST{rng.randrange(10**12):012d}"
    if entity_type == "LOCATION":
        return _PLACES[rng.randrange(len(_PLACES))] if n <= len(_PLACES) else f"{_PLACES[n % len(_PLACES)]} {n}"
    if entity_type == "API_KEY":
        return "sk-surrogate-" + _token(rng, 24)
    if entity_type in ("PASSWORD", "SECRET", "PRIVATE_KEY", "JWT", "AWS_ACCESS_KEY"):
        return f"surrogate-{entity_type.lower()}-" + _token(rng, 12)
    return f"{entity_type.lower()}-{n}-{_token(rng, 6, string.ascii_lowercase + string.digits)}"
