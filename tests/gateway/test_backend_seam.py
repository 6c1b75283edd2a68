"""The backend seam declares what callers ask of a target (no probing): the defaults a remote
target gets, and that a target must say how it answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.backends.base import Backend, BackendError, CallOptions
from gateway.backends.openai_http import OpenAIHTTPBackend


async def test_a_remote_target_gets_the_declared_defaults() -> None:
    async with OpenAIHTTPBackend("cloud", model="openai/m", api_base="http://127.0.0.1:1/v1", api_key="k",
                                 timeout_s=1.0, extra_body=None) as backend:
        assert isinstance(backend, Backend)
        assert backend.ready and backend.load_error is None
        assert backend.stats() is None
        assert backend.supports_embeddings
        backend.load()  # nothing to load: returns at once


async def test_a_target_must_answer_and_only_embeds_when_it_says_so() -> None:
    class Half(Backend):
        async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError):
        Half()  # type: ignore[abstract]

    class ChatOnly(Half):
        name = "chat-only"

        async def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]:
            yield {}

    backend = ChatOnly()
    assert not backend.supports_embeddings
    with pytest.raises(BackendError) as err:
        await backend.embed({"input": ["x"]}, CallOptions(deadline=0.0))
    assert err.value.kind == "invalid" and "chat-only" in err.value.message
