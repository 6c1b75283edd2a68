"""Bad input: one clear line naming the file and the problem (API and CLI, exit code 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from local_engine.cli import main
from local_engine.engine import Engine
from local_engine.errors import EngineError, ModelFileError, UnsupportedModel


def _write_gguf(path: Path, arch: str, qtype: str = "F32") -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if qtype == "F32":
        w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    else:  # raw bytes of an exotic type we do not implement
        t = gguf.GGMLQuantizationType[qtype]
        block, nbytes = gguf.GGML_QUANT_SIZES[t]
        w.add_tensor("token_embd.weight", np.zeros((8, 256 // block * nbytes), dtype=np.uint8), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _truncated(smol_path: Path, tmp_path: Path) -> Path:
    p = tmp_path / "truncated.gguf"
    with open(smol_path, "rb") as src:
        p.write_bytes(src.read(20_000_000))
    return p


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"missing\.gguf: no such file"):
        Engine.open(tmp_path / "missing.gguf")


def test_corrupt_file(tmp_path: Path) -> None:
    p = tmp_path / "corrupt.gguf"
    p.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelFileError, match=r"corrupt.gguf: not a GGUF file"):
        Engine.open(p)


def test_truncated_file(smol_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"truncated.gguf: truncated: tensor .* ends at byte"):
        Engine.open(_truncated(smol_path, tmp_path))


def test_truncated_header(smol_path: Path, tmp_path: Path) -> None:
    p = tmp_path / "header.gguf"
    with open(smol_path, "rb") as src:
        p.write_bytes(src.read(300_000))  # cut inside the vocabulary
    with pytest.raises(ModelFileError, match=r"header\.gguf: corrupt or truncated GGUF header"):
        Engine.open(p)


def test_unsupported_architecture(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel, match=r"gpt2.gguf: unsupported: architecture 'gpt2'"):
        Engine.open(_write_gguf(tmp_path / "gpt2.gguf", "gpt2"))


def test_unsupported_quant_type(tmp_path: Path) -> None:
    from local_engine.store import GGUFStore

    store = GGUFStore(_write_gguf(tmp_path / "iq.gguf", "llama", "IQ2_XXS"))
    with pytest.raises(UnsupportedModel, match=r"iq\.gguf: unsupported: tensor token_embd\.weight has quant type IQ2_XXS"):
        store.get("token_embd.weight")


def test_hf_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelFileError, match=r"no \*\.safetensors"):
        Engine.open(tmp_path)


def test_unknown_builtin() -> None:
    with pytest.raises(EngineError, match="builtin:nope: unknown built-in"):
        Engine.open("builtin:nope")


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "arch"])
def test_cli_exit_2_one_line(case: str, smol_path: Path, tmp_path: Path) -> None:
    if case == "missing":
        p, expect = tmp_path / "nope.gguf", "no such file"
    elif case == "corrupt":
        p, expect = tmp_path / "bad.gguf", "not a GGUF file"
        p.write_bytes(b"\0" * 1000)
    elif case == "truncated":
        p, expect = _truncated(smol_path, tmp_path), "truncated"
    else:
        p, expect = _write_gguf(tmp_path / "gpt2.gguf", "gpt2"), "architecture 'gpt2'"
    for args in (["info", str(p)], ["generate", str(p), "--prompt", "hi"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(p) in lines[0] and expect in lines[0], r.stderr
        assert "Traceback" not in r.output


def test_cli_generate_with_stats(smol_path: Path) -> None:
    r = CliRunner().invoke(main, ["generate", "builtin:smollm2-135m", "--chat", "What is the capital of France?",
                                  "--max-tokens", "16", "--stats", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "Paris" in r.stdout
    assert "prefill" in r.stderr and "decode" in r.stderr and "peak RSS" in r.stderr


def test_one_error_tree() -> None:
    """Every engine error is an EngineError (one except clause for callers); the built-in second
    bases stay for code that caught those before."""
    import torch

    from local_engine.errors import BudgetError, ContextOverflow, PackError, UnsupportedArchitecture
    from local_engine.models.layers import KVCache

    for cls in (ModelFileError, UnsupportedModel, PackError, UnsupportedArchitecture, BudgetError, ContextOverflow):
        assert issubclass(cls, EngineError), cls
    assert issubclass(BudgetError, ValueError) and issubclass(ContextOverflow, ValueError)
    assert issubclass(PackError, RuntimeError)
    cache = KVCache(1, 1, 4, 2)
    with pytest.raises(ContextOverflow, match=r"context length exceeded: 3 > 2 tokens"):
        cache.update(0, torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), 0)
