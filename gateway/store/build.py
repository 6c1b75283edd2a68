"""The store a policy's `state:` section asks for, and the vault key that goes with a shared one."""

from __future__ import annotations

import base64
import binascii
import os

from gateway.policy.model import StateConfig
from gateway.store.base import StateStore
from gateway.store.embedded import EmbeddedStore

VAULT_KEY_ENV = "GATEWAY_VAULT_KEY"


class StateConfigError(ValueError):
    """The state backend cannot start as configured (said in words, at startup)."""


def vault_key(env: dict[str, str] | None = None) -> bytes:
    """The AEAD key for conversation vaults on a shared store: 32 bytes, base64 or hex in
    GATEWAY_VAULT_KEY. Required: a shared store must never hold a vault it could read in clear."""
    raw = (env if env is not None else os.environ).get(VAULT_KEY_ENV, "").strip()
    if not raw:
        raise StateConfigError(
            f"state.backend is redis but {VAULT_KEY_ENV} is not set: conversation vaults are encrypted on the "
            f"shared store with it. Set it to the same 32-byte key, base64, on every replica, e.g. "
            f"{VAULT_KEY_ENV}=$(python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())')"
        )
    key: bytes | None = None
    if len(raw) == 64:
        try:
            key = bytes.fromhex(raw)
        except ValueError:
            key = None
    if key is None:
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_" if ("-" in raw or "_" in raw) else None,
                                   validate=True)
        except (binascii.Error, ValueError):
            key = None
    if key is None or len(key) != 32:
        raise StateConfigError(f"{VAULT_KEY_ENV} must be 32 bytes, written as base64 (44 characters) or hex (64).")
    return key


def build_store(cfg: StateConfig) -> StateStore:
    if cfg.backend == "embedded":
        return EmbeddedStore()
    from gateway.store.redis import RedisStore  # only a redis deployment needs the client

    assert cfg.url is not None  # the policy model requires it
    return RedisStore(cfg.url, timeout_s=cfg.timeout_ms / 1000)
