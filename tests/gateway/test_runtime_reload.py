"""What a policy reload keeps, drops and bounds: the shared classifiers, the state's tasks, the
conversation vaults (and their TTL)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway import runtime
from gateway.privacy.config import PrivacyConfig
from gateway.state import GatewayState, Settings
from gateway.store.embedded import EmbeddedStore
from gateway.store.vaults import SharedVaultStore
from tests.support.policies import policy_yaml

NOWHERE = "http://127.0.0.1:1/v1"  # never called: these tests build runtimes, they send nothing


def _write(path: Path, vault_ttl_s: float) -> Path:
    path.write_text(policy_yaml(NOWHERE, NOWHERE, cloud={"timeout_s": 1}, local={"timeout_s": 1}, rest=f"""
        privacy: {{enabled: false, vault_ttl_s: {vault_ttl_s}}}
        difficulty: {{method: heuristic}}
        rules:
          - name: default
            route: local
        """))
    return path


def _state(path: Path) -> GatewayState:
    return GatewayState(Settings(policy_path=str(path), watch=False, reload_grace_s=0.0))


def test_shared_classifiers_keep_only_the_configurations_used_last() -> None:
    first, second, third = (PrivacyConfig(enabled=False, vault_ttl_s=t) for t in (11.0, 12.0, 13.0))
    a = runtime.shared_sensitivity(first)
    b = runtime.shared_sensitivity(second)
    assert runtime.shared_sensitivity(first) is a and runtime.shared_sensitivity(second) is b
    c = runtime.shared_sensitivity(third)  # `first` is now the least recently used: dropped
    assert runtime.shared_sensitivity(third) is c and runtime.shared_sensitivity(second) is b
    assert runtime.shared_sensitivity(first) is not a
    assert len(runtime._CLASSIFIERS["sensitivity"]) == runtime._KEEP_CLASSIFIERS


async def test_reloads_do_not_pile_up_tasks(tmp_path: Path) -> None:
    state = _state(_write(tmp_path / "p.yaml", 3600))
    try:
        for _ in range(5):
            assert await state.reload()
            await asyncio.sleep(0.01)  # the retirement (grace 0) finishes
        assert len(state._tasks) <= 1
    finally:
        await state.stop()


async def test_a_changed_vault_ttl_takes_effect_and_keeps_the_conversations(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.yaml", 3600)
    state = _state(path)
    try:
        vault = state.runtime.vaults.get("conversation-1")
        _write(path, 0.2)
        assert await state.reload()
        assert state.runtime.vaults.get("conversation-1") is vault  # the reload kept it
        await asyncio.sleep(0.35)
        assert state.runtime.vaults.get("conversation-1") is not vault  # expired under the new TTL
    finally:
        await state.stop()


async def test_shared_vaults_take_a_new_ttl_on_the_same_store() -> None:
    store = EmbeddedStore()
    vaults = SharedVaultStore(store, b"k" * 32, 3600)
    shorter = vaults.with_ttl(0.2)
    assert shorter.ttl_s == 0.2 and vaults.ttl_s == 3600
    vault = await vaults.load("conversation-1")
    placeholder = vault.replacement_for("PERSON", "Ada Lovelace")
    await vaults.save("conversation-1", vault)
    again = await shorter.load("conversation-1")  # the same conversations
    assert again.replacement_for("PERSON", "Ada Lovelace") == placeholder
    await shorter.save("conversation-1", again)
    await asyncio.sleep(0.35)
    assert (await shorter.load("conversation-1")).to_state() == (await vaults.load("nobody")).to_state()
    await store.aclose()
