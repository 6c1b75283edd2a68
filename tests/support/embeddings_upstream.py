"""A fake cloud that also serves OpenAI's POST /v1/embeddings, on loopback.

Each input gets a deterministic unit vector derived from its text (sha256), `dimensions` long when
asked (default `dims`), so a test can tell which upstream made a vector and that it was made from
the raw text. Bodies are recorded in `received` like every FakeUpstream request; faults apply when
their `paths` include "/embeddings". `send_usage = False` answers without `usage`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from tests.support.upstream import FakeUpstream, _Handler


def vector_for(text: str, dims: int) -> list[float]:
    raw: list[float] = []
    counter = 0
    while len(raw) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        raw += [b / 255 - 0.5 for b in digest]
        counter += 1
    v = raw[:dims]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


class _EmbeddingsHandler(_Handler):
    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/embeddings"):
            super().do_POST()
            return
        owner: EmbeddingsUpstream = self.server.owner  # type: ignore[assignment]
        if (body := self._receive()) is None:
            return
        if self._common_fault(self._fault_for(self.path)):
            return
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        dims = body.get("dimensions") or owner.dims
        answer: dict[str, Any] = {
            "object": "list",
            "model": owner.model,
            "data": [{"object": "embedding", "index": i, "embedding": vector_for(t, dims)}
                     for i, t in enumerate(texts)],
        }
        if owner.send_usage:
            tokens = sum(len(t.split()) for t in texts)
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._send(200, json.dumps(answer).encode())


class EmbeddingsUpstream(FakeUpstream):
    handler = _EmbeddingsHandler

    def __init__(self, *args: Any, dims: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dims = dims
        self.send_usage = True

    def reset(self) -> None:
        super().reset()
        self.send_usage = True
