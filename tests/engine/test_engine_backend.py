"""EngineBackend driven directly: OpenAI shapes, the bounded queue, deadline and cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.backends.base import Backend, BackendError, CallOptions
from gateway.backends.engine_backend import EngineBackend

Q = {"model": "local-smol", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
STORY = {"model": "local-smol", "max_tokens": 400,
         "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}


def _opts(seconds: float = 120.0) -> CallOptions:
    return CallOptions(deadline=time.monotonic() + seconds, request_id="t")


@pytest.fixture
def backend(smol):
    b = EngineBackend("local", "builtin:smollm2-135m", max_queue=2)
    b.engine = smol  # share the session's loaded model; loading is tested separately below
    return b


async def test_complete_shape_and_answer(backend: EngineBackend) -> None:
    assert isinstance(backend, Backend) and backend.ready
    r = await backend.complete(dict(Q, tools=[{"type": "function", "function": {"name": "f"}}]), _opts())
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-") and r["model"] == "local-smol"
    msg = r["choices"][0]["message"]
    assert msg["role"] == "assistant" and "Paris" in msg["content"]
    assert r["choices"][0]["finish_reason"] == "stop"
    u = r["usage"]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    s = backend.stats()
    assert s["completed"] == 1 and s["last_decode_tok_s"] and s["ready"]
    await backend.aclose()


async def test_stream_chunks(backend: EngineBackend) -> None:
    chunks = [c async for c in backend.stream(Q, _opts())]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    whole = await backend.complete(Q, _opts())
    assert whole["choices"][0]["message"]["content"] == text  # greedy: same answer both ways
    await backend.aclose()


async def test_queue_full_is_503_and_cancel_frees_worker(smol) -> None:
    b = EngineBackend("local", "builtin:smollm2-135m", max_queue=1)
    b.engine = smol
    agen = b.stream(STORY, _opts())
    first = await agen.__anext__()  # the worker is now busy with the story
    assert first["choices"][0]["delta"]["role"] == "assistant"
    with pytest.raises(BackendError) as ei:
        await b.complete(Q, _opts())
    e = ei.value
    assert e.kind == "overloaded" and e.status == 503 and e.retry_after and e.retry_after >= 1
    assert b.stats()["rejected_overloaded"] == 1
    await agen.aclose()  # the client went away: the worker stops within a decode step
    t0 = time.monotonic()
    while b.stats()["in_flight"] and time.monotonic() - t0 < 10:
        await asyncio.sleep(0.01)
    stopped_after = time.monotonic() - t0
    print(f"\nworker stopped {stopped_after * 1000:.0f} ms after the client went away")
    assert stopped_after < 5
    r = await b.complete(Q, _opts())
    assert "Paris" in r["choices"][0]["message"]["content"]
    assert b.stats()["cancelled"] == 1 and b.stats()["completion_tokens"] < 400
    await b.aclose()


async def test_deadline_ends_with_length(backend: EngineBackend) -> None:
    t0 = time.monotonic()
    try:
        r = await backend.complete(STORY, _opts(3.0))
    except BackendError as e:  # prefill alone outlived the deadline on a very busy machine
        assert e.kind == "timeout"
    else:
        assert r["choices"][0]["finish_reason"] == "length"
        assert 0 < r["usage"]["completion_tokens"] < 400
    assert time.monotonic() - t0 < 3.0 + 10
    assert backend.stats()["timeouts"] == 1
    await backend.aclose()


async def test_expired_deadline_is_timeout(backend: EngineBackend) -> None:
    with pytest.raises(BackendError) as ei:
        await backend.complete(Q, _opts(-1.0))
    assert ei.value.kind == "timeout"
    await backend.aclose()


async def test_missing_model_is_clear_error(tmp_path) -> None:
    b = EngineBackend("local", str(tmp_path / "nope.gguf"))
    with pytest.raises(BackendError) as ei:
        await b.complete(Q, _opts())
    assert ei.value.kind == "connect" and "nope.gguf" in ei.value.message and not b.ready
    with pytest.raises(BackendError):  # remembered: fails fast afterwards
        await b.complete(Q, _opts())
    await b.aclose()


async def test_lazy_load_in_worker() -> None:
    b = EngineBackend("local", "builtin:smollm2-135m", threads=2)
    assert not b.ready
    b.start_loading()
    r = await b.complete(dict(Q, max_tokens=8), _opts(600))
    assert b.ready and b.stats()["load_s"] is not None
    assert r["usage"]["completion_tokens"] <= 8
    await b.aclose()
