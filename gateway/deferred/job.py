"""One deferred request as it is stored: the redacted body, the targets it may go to, and its
vault sealed with AES-GCM (the placeholder -> value map is the only raw PII it carries)."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from gateway.privacy.vault import Vault

Status = Literal["queued", "in_progress", "completed", "failed"]
FINAL: frozenset[str] = frozenset({"completed", "failed"})
ID_PREFIX = "defer_"
_NONCE = 12


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(16)  # 128 random bits: the id is the capability to read it


def valid_id(value: str) -> bool:
    rest = value.removeprefix(ID_PREFIX)
    return value.startswith(ID_PREFIX) and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)


@dataclass(frozen=True)
class Job:
    id: str
    client: str | None
    body: dict[str, Any]  # redacted where the rule redacts; never streamed
    chain: tuple[str, ...]
    rule: str
    idempotency_key: str
    prompt_tokens: int
    sealed_vault: bytes | None = None  # None: nothing was redacted
    callback_url: str | None = None
    created: float = field(default_factory=time.time)
    # The API it came in on (None: chat completions) and what of the request its answer echoes
    # back in that API's shape (model, limits, tools: never the prompt, instructions, metadata or user).
    wire: str | None = None
    echo: dict[str, Any] | None = None
    # What changes as it is sent:
    status: Status = "queued"
    attempts: int = 0
    target: str | None = None
    result: dict[str, Any] | None = None  # the answer as the cloud wrote it: placeholders, no raw values
    error: dict[str, Any] | None = None
    completed: float | None = None
    callback: str | None = None  # pending / delivered / failed, when there is a callback_url

    def spec(self) -> bytes:
        """The part written once at acceptance."""
        return orjson.dumps({
            "client": self.client, "body": self.body, "chain": list(self.chain), "rule": self.rule,
            "idempotency_key": self.idempotency_key, "prompt_tokens": self.prompt_tokens,
            "sealed_vault": self.sealed_vault.hex() if self.sealed_vault is not None else None,
            "callback_url": self.callback_url, "created": self.created, "wire": self.wire, "echo": self.echo,
        })

    @classmethod
    def from_spec(cls, job_id: str, spec: bytes, **state: Any) -> Job:
        s = orjson.loads(spec)
        vault = s.get("sealed_vault")
        job = cls(id=job_id, client=s["client"], body=s["body"], chain=tuple(s["chain"]), rule=s["rule"],
                  idempotency_key=s["idempotency_key"], prompt_tokens=s["prompt_tokens"],
                  sealed_vault=bytes.fromhex(vault) if vault else None, callback_url=s.get("callback_url"),
                  created=s["created"], wire=s.get("wire"), echo=s.get("echo"))
        return replace(job, **state)


class Sealer:
    """AES-GCM over a job's vault, the job id as associated data (a blob moved to another job's
    record does not open)."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def seal(self, job_id: str, vault: Vault) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, orjson.dumps(vault.to_state()), job_id.encode())

    def open(self, job_id: str, blob: bytes) -> Vault:
        plain = self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], job_id.encode())
        return Vault.from_state(orjson.loads(plain))
