"""POST /v1/embeddings (OpenAI's wire format): the request model and the pure conversions.

In: the inputs become the user messages of a chat body, so classification, the policy and explain
see them exactly as they see a chat prompt. Out: whatever a target answered (a cloud's JSON, the
device's MiniLM) is checked and rebuilt into one `CreateEmbeddingResponse`, the vectors encoded as
the client asked (`base64`: little-endian float32, what the openai SDK decodes; it asks for that by
default). Upstreams are always asked for floats, so every target answers alike.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.backends.base import BackendError

PATH = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(description="A string or a list of strings (token-id arrays are refused).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: str | None = Field(None, max_length=256)

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, v: Any) -> Any:
        items = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not v:
            raise ValueError("input must not be an empty list")
        if any(isinstance(x, int | list) and not isinstance(x, bool) for x in items):
            raise ValueError("token-id arrays are not supported here: send the text")
        if isinstance(v, list) and len(v) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        if any(isinstance(x, str) and not x.strip() for x in items):
            raise ValueError("input strings must not be empty")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def classify_body(req: EmbeddingsRequest, model: str) -> dict[str, Any]:
    """The chat body the pipeline classifies and decides on: one user message per input."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": t} for t in req.texts]}
    if req.user is not None:
        body["user"] = req.user
    return body


def upstream_body(req: EmbeddingsRequest, model: str) -> dict[str, Any]:
    """What a target is sent: its embedding model, the inputs as a list, floats."""
    body: dict[str, Any] = {"model": model, "input": req.texts, "encoding_format": "float"}
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    if req.user is not None:
        body["user"] = req.user
    return body


def _vector(value: Any, target: str) -> list[float]:
    if isinstance(value, str):  # an upstream that answers base64 whatever it was asked
        try:
            return np.frombuffer(base64.b64decode(value, validate=True), dtype="<f4").tolist()
        except ValueError:
            raise BackendError("protocol", f"{target}: an embedding is not valid base64") from None
    if not isinstance(value, list) or not value or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        raise BackendError("protocol", f"{target}: an embedding is not a list of numbers")
    return [float(x) for x in value]


def normalise(raw: dict[str, Any], req: EmbeddingsRequest, target: str) -> dict[str, Any]:
    """A target's answer as {model, vectors (in input order), usage}, or BackendError("protocol")
    (so the chain moves on) when it is not one vector per input of one size."""
    n = len(req.texts)
    data = raw.get("data")
    if not isinstance(data, list) or len(data) != n:
        raise BackendError("protocol", f"{target}: expected {n} embeddings")
    ordered: list[list[float] | None] = [None] * n
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise BackendError("protocol", f"{target}: an embedding item is not an object")
        index = item.get("index", i)
        if not isinstance(index, int) or not 0 <= index < n or ordered[index] is not None:
            raise BackendError("protocol", f"{target}: embedding indexes are not 0..{n - 1}")
        ordered[index] = _vector(item.get("embedding"), target)
    vectors = [v for v in ordered if v is not None]
    sizes = {len(v) for v in vectors}
    if len(sizes) != 1 or (req.dimensions is not None and sizes != {req.dimensions}):
        raise BackendError("protocol", f"{target}: embeddings of the wrong size")
    raw_usage = raw.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    prompt = usage.get("prompt_tokens")
    estimated = not isinstance(prompt, int) or isinstance(prompt, bool)
    if estimated:  # ~4 characters a token, as pipeline.estimate_tokens
        prompt = max(1, sum(len(t) for t in req.texts) // 4)
    model = raw.get("model") if isinstance(raw.get("model"), str) and raw.get("model") else target
    return {"model": model, "vectors": vectors, "prompt_tokens": prompt, "usage_estimated": estimated}


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def response(result: dict[str, Any], encoding_format: str) -> dict[str, Any]:
    """The OpenAI `CreateEmbeddingResponse`."""
    tokens = result["prompt_tokens"]
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)}
                 for i, v in enumerate(result["vectors"])],
        "model": result["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
