"""Any provider litellm supports (Anthropic, Bedrock, Vertex, …), through `litellm.acompletion`."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from gateway.backends.base import Backend, BackendError, CallOptions
from gateway.backends.errors import from_litellm

# The machine may be offline: litellm must not fetch its cost map at import (litellm #739).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


async def stop_logging_worker() -> None:
    """Stop litellm's logging worker if it runs on this event loop (the gateway's, at shutdown).
    Left running, its pending `_worker_loop` coroutine is collected after the loop has closed and
    Python reports "Event loop is closed". A worker bound to another loop (another gateway in the
    same process) is left to that one: cancelling its tasks from here would not be thread-safe."""
    if "litellm" not in sys.modules:  # never imported: nothing was logged
        return
    from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

    if GLOBAL_LOGGING_WORKER._bound_loop is not asyncio.get_running_loop():  # no public accessor
        return
    try:
        await asyncio.wait_for(GLOBAL_LOGGING_WORKER.flush(), timeout=2)
    except Exception:  # shutting down: callbacks that do not finish are dropped
        pass
    await GLOBAL_LOGGING_WORKER.stop(discard_pending=True, timeout=2)


def _to_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    return obj.model_dump(exclude_none=True)


class LitellmBackend(Backend):
    supports_embeddings = True

    def __init__(
        self,
        name: str,
        *,
        model: str,
        api_base: str | None,
        api_key: str | None,
        timeout_s: float,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        import litellm

        litellm.telemetry = False
        litellm.drop_params = True  # a provider that lacks a parameter should not fail the request
        self._litellm = litellm
        self.name = name
        self.model = model
        self.api_base = api_base
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.extra_body = extra_body or {}

    def _kwargs(self, body: dict[str, Any], opts: CallOptions, stream: bool) -> dict[str, Any]:
        left = opts.deadline - time.monotonic()
        if left <= 0:
            raise BackendError("timeout", f"deadline passed before calling {self.name}")
        kwargs = {k: v for k, v in body.items() if k not in ("model", "stream", "stream_options")}
        kwargs.update(self.extra_body)
        kwargs.update(
            model=self.model,
            stream=stream,
            timeout=min(self.timeout_s, left),
            num_retries=0,  # retries are ours (tenacity), bounded by the request deadline
        )
        if stream:
            kwargs["stream_options"] = {"include_usage": True}
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self.api_key:
            kwargs["api_key"] = self.api_key
        return kwargs

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        try:
            resp = await self._litellm.acompletion(**self._kwargs(body, opts, False))
        except Exception as exc:
            raise from_litellm(self.name, exc) from None
        return _to_dict(resp)

    async def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]:
        try:
            resp = await self._litellm.acompletion(**self._kwargs(body, opts, True))
            async for chunk in resp:
                yield _to_dict(chunk)
        except BackendError:
            raise
        except Exception as exc:
            raise from_litellm(self.name, exc) from None

    async def embed(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        """`litellm.aembedding`; `body["model"]` is the target's embedding model (a litellm string)."""
        left = opts.deadline - time.monotonic()
        if left <= 0:
            raise BackendError("timeout", f"deadline passed before calling {self.name}")
        kwargs: dict[str, Any] = {k: v for k, v in body.items() if k in ("input", "dimensions", "user")}
        kwargs.update(model=body["model"], timeout=min(self.timeout_s, left), num_retries=0,
                      encoding_format="float")
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self.api_key:
            kwargs["api_key"] = self.api_key
        try:
            resp = await self._litellm.aembedding(**kwargs)
        except Exception as exc:
            raise from_litellm(self.name, exc) from None
        return _to_dict(resp)

    async def aclose(self) -> None:
        return None
