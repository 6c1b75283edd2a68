"""Conversation vaults on the shared store, so a conversation's next turn may land on any replica.

Each vault is one value, AES-GCM encrypted with GATEWAY_VAULT_KEY (the store never sees a raw
value) under a key derived from the conversation id by HMAC (nor the id itself), rewritten after
every turn with the TTL, which the store enforces. Two turns of one conversation running at the
same moment on two replicas: the later write wins (a conversation's turns are sequential in
practice; a lost placeholder only means a value gets a new one next turn, never a leak).
"""

from __future__ import annotations

import hashlib
import hmac
import os

import orjson

from gateway.privacy.vault import Mode, Vault, VaultStore
from gateway.store.base import StateStore, StoreUnavailable

_NONCE = 12


class SharedVaultStore(VaultStore):
    def __init__(self, store: StateStore, key: bytes, ttl_s: float, *, mode: Mode = "placeholder") -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # a shared store's need only

        super().__init__(ttl_s, mode=mode)
        self._store = store
        self._aead = AESGCM(key)
        self._id_key = hmac.new(key, b"conversation-id", hashlib.sha256).digest()

    def _key(self, conversation_id: str) -> str:
        return "vault:" + hmac.new(self._id_key, conversation_id.encode(), hashlib.sha256).hexdigest()

    async def load(self, conversation_id: str | None) -> Vault:
        if not conversation_id:
            return Vault(self._mode)
        key = self._key(conversation_id)
        blob = await self._store.get(key)
        if blob is None:
            return Vault(self._mode)
        from cryptography.exceptions import InvalidTag

        try:
            # The store key as associated data: a blob moved to another conversation's key fails.
            plain = self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], key.encode())
        except (InvalidTag, ValueError):
            # Written under another key, or tampered with: unreadable, so this turn cannot be
            # restored consistently; the caller fails closed rather than starting afresh silently.
            raise StoreUnavailable("conversation vault unreadable (wrong GATEWAY_VAULT_KEY?)") from None
        return Vault.from_state(orjson.loads(plain))

    async def save(self, conversation_id: str | None, vault: Vault) -> None:
        if not conversation_id:
            return
        key = self._key(conversation_id)
        nonce = os.urandom(_NONCE)
        blob = nonce + self._aead.encrypt(nonce, orjson.dumps(vault.to_state()), key.encode())
        await self._store.set(key, blob, self._ttl)

    def __len__(self) -> int:  # unknown without a scan of the shared store
        return 0

    def __repr__(self) -> str:
        return f"SharedVaultStore(store={self._store.name}, ttl_s={self._ttl})"


def build_vaults(store: StateStore, ttl_s: float) -> VaultStore:
    """In-process vaults on the embedded store; encrypted ones on a shared store (which needs
    GATEWAY_VAULT_KEY: a clear startup error without it)."""
    if not store.shared:
        return VaultStore(ttl_s=ttl_s)
    from gateway.store.build import vault_key

    return SharedVaultStore(store, vault_key(), ttl_s)
