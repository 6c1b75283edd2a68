"""What ``pack`` reads a checkpoint through: ``PackSource``, and the safetensors one.

A source presents an MoE checkpoint under Hugging Face tensor names with an HF ``config``;
``pack`` (formats/pack_writer.py) writes the flash layout from any of them. ``SafetensorsSource`` reads
an HF directory; ``formats.gguf_moe.GGUFSource`` maps a llama.cpp GGUF file onto the same names.
"""

from __future__ import annotations

import abc
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from local_engine.errors import PackError

# small files an HF directory's tokenizer is made of: copied into a pack so Engine.open(dst) chats
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> bool:
    """Copy the HF tokenizer files ``src`` has into ``dst``; False when it has none."""
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in found:
        shutil.copyfile(src / name, dst / name)
    return bool(found)


class PackSource(abc.ABC):
    """A checkpoint ``pack`` can read: ``config`` (HF config.json), ``where`` (every tensor's HF name,
    iterable), and tensors by name, one expert at a time for fused layouts."""

    src: Path  # the file or directory, for messages
    config: dict[str, Any]
    where: dict[str, Any]

    @property
    @abc.abstractmethod
    def config_where(self) -> str:
        """Where the config came from, for an error about it."""

    def has(self, name: str) -> bool:
        return name in self.where

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``."""

    @abc.abstractmethod
    def get_row(self, name: str, i: int) -> torch.Tensor:
        """Row ``i`` of a tensor (expert ``i`` of a fused [E, ...] expert tensor)."""

    @abc.abstractmethod
    def write_tokenizer(self, dst: Path) -> bool:
        """Write the checkpoint's tokenizer in HF form into ``dst``; False when it has none."""


class SafetensorsSource(PackSource):
    """Lazy view over an HF safetensors directory: name -> shard, slices read on demand."""

    def __init__(self, src: Path) -> None:
        self.src = src
        cfg_path = src / "config.json"
        if not cfg_path.is_file():
            raise PackError(f"{src}: no config.json (expected a Hugging Face safetensors directory)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise PackError(f"{cfg_path}: invalid JSON: {e}") from None
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise PackError(f"{src}: no *.safetensors files")
        self._handles = []
        self.where = {}
        for s in shards:
            try:
                h = safe_open(str(s), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise PackError(f"{s}: cannot open safetensors file: {e}") from None
            self._handles.append(h)
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not dicts
                self.where[k] = h

    @property
    def config_where(self) -> str:
        return str(self.src / "config.json")

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.where[name].get_tensor(name)
        except KeyError:
            raise PackError(f"{self.src}: tensor {name} missing from checkpoint") from None

    def get_row(self, name: str, i: int) -> torch.Tensor:
        return self.where[name].get_slice(name)[i]

    def write_tokenizer(self, dst: Path) -> bool:
        return copy_tokenizer_files(self.src, dst)
