"""Where weight bytes come from. Model code asks a store for tensors by name, one at a time.

    TensorStore (protocol)
      info: StoreInfo            path, format ("gguf" | "safetensors"), metadata (GGUF key/values
                                 or the HF config.json)
      names() -> list[str]       native tensor names (GGUF "blk.0.attn_q.weight", HF "model.…")
      get(name) -> Tensor        float tensor, PyTorch layout ([out, in] for matrices), fp32 for
                                 GGUF quantised types (dequantised on demand), the stored dtype
                                 for safetensors
      raw(name) -> RawTensor|None  the still-quantised payload for GGUF quantised tensors, so the
                                 model can keep them quantised (int4/int8 kernels); None otherwise

Both implementations are lazy: GGUF is memory-mapped by ``gguf.GGUFReader``; safetensors files
are opened with ``safe_open`` and each tensor is read when asked. Nothing here holds "the model".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from local_engine.errors import ModelFileError, UnsupportedModel
from local_engine.formats.gguf import GGUFFile, dequantize_blocks

# Quant types we can dequantise (gguf.quants implements them in numpy).
SUPPORTED_GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
                        "Q6_K", "Q2_K", "Q3_K"}


@dataclass
class StoreInfo:
    path: Path
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RawTensor:
    name: str
    qtype: str  # GGML type name, e.g. "Q4_1"
    shape: tuple[int, ...]  # logical PyTorch shape (rows, cols)
    data: np.ndarray  # uint8 [rows, row_bytes], memory-mapped


class TensorStore(Protocol):
    info: StoreInfo

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def raw(self, name: str) -> RawTensor | None: ...


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(path, "no such file or directory")
    if path.is_file() and not os.access(path, os.R_OK):
        raise ModelFileError(path, "not readable")


class GGUFStore:
    """A memory-mapped GGUF file (header parsed by local_engine.formats.gguf)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        _check_file(self.path)
        self._file = GGUFFile(self.path)
        meta = {k: v for k, v in self._file.metadata.items() if not isinstance(v, list) or len(v) < 1024}
        self.info = StoreInfo(self.path, "gguf", meta)

    def array(self, key: str) -> list[Any]:
        """A metadata array, including the large ones left out of ``info.metadata``."""
        return list(self._file.metadata.get(key) or [])

    def names(self) -> list[str]:
        return list(self._file.tensors)

    def _tensor(self, name: str) -> Any:
        t = self._file.tensors.get(name)
        if t is None:
            raise ModelFileError(self.path, f"missing tensor {name!r}")
        return t

    def qtype(self, name: str) -> str:
        return str(self._tensor(name).type_name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def get(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        q = t.type_name
        if q not in SUPPORTED_GGUF_TYPES:
            raise UnsupportedModel(self.path, f"tensor {name} has quant type {q}")
        data = self._file.data(name)
        if q in ("F32", "F16"):
            return torch.from_numpy(np.ascontiguousarray(data.astype(np.float32))).reshape(t.shape)
        return dequantize_blocks(data, q).reshape(t.shape)

    def raw(self, name: str) -> RawTensor | None:
        t = self._tensor(name)
        q = t.type_name
        if q in ("F32", "F16", "BF16"):
            return None
        if q not in SUPPORTED_GGUF_TYPES:
            raise UnsupportedModel(self.path, f"tensor {name} has quant type {q}")
        return RawTensor(name, q, tuple(t.shape), self._file.data(name))


class SafetensorsStore:
    """An HF model directory: ``config.json`` plus one or more ``*.safetensors`` files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        _check_file(self.path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise ModelFileError(self.path, "not a model directory (no config.json)")
        try:
            config = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise ModelFileError(cfg, f"invalid JSON ({e})") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelFileError(self.path, "no *.safetensors files")
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as e:
                raise ModelFileError(f, f"corrupt or truncated safetensors ({e})") from None
            self._handles[str(f)] = h
            for k in keys:
                self._where[k] = str(f)
        self.info = StoreInfo(self.path, "safetensors", config)

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise ModelFileError(self.path, f"missing tensor {name!r}")
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:
            raise ModelFileError(f, f"cannot read tensor {name} ({e})") from None

    def raw(self, name: str) -> RawTensor | None:
        return None

