"""Bad input to pack / open / read: clear errors that name the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from local_engine.errors import BudgetError, EngineError, PackError, UnsupportedArchitecture
from local_engine.formats.pack import read_manifest
from local_engine.formats.pack_writer import pack
from local_engine.models.moe import MoEModel
from local_engine.pack_cli import main as pack_main
from tests.moe.conftest import PROMPT, Tiny


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(src, dst)
    return dst


def test_truncated_expert_file(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    d = _copy(tiny_models["mixtral"].packed["none"], tmp_path)
    data = d / "experts.bin"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4096)
    with pytest.raises(PackError, match=r"experts\.bin: truncated"):
        MoEModel.open(d)


def test_checksum_mismatch_is_reported_on_read(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    d = _copy(tiny_models["qwen3_moe"].packed["none"], tmp_path)
    m = read_manifest(d)
    data = d / "experts.bin"
    raw = bytearray(data.read_bytes())
    # corrupt every bundle so whichever expert is routed first trips the check
    for slot in range(m.num_bundles):
        raw[slot * m.stride + 100] ^= 0xFF
    data.write_bytes(bytes(raw))
    model = MoEModel.open(d, memory_budget=0)
    try:
        with pytest.raises(PackError, match=r"experts\.bin: checksum mismatch for layer \d+ expert \d+"):
            model.logits(PROMPT)
    finally:
        model.close()


def test_corrupt_resident_tensor(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    d = _copy(tiny_models["qwen3_moe"].packed["none"], tmp_path)
    p = d / "resident.bin"
    raw = bytearray(p.read_bytes())
    raw[10] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(PackError, match=r"resident\.bin: checksum mismatch in resident tensor"):
        MoEModel.open(d)


def test_budget_below_one_layers_experts(tiny_models: dict[str, Tiny]) -> None:
    p = tiny_models["mixtral"].packed["none"]
    stride = read_manifest(p).stride
    with pytest.raises(BudgetError, match="below one layer's active experts") as err:
        MoEModel.open(p, memory_budget=stride)  # top-2 needs 2 bundles
    assert isinstance(err.value, EngineError)  # one tree: the gateway catches EngineError alone
    MoEModel.open(p, memory_budget=2 * stride).close()  # the documented minimum works


def test_unsupported_architecture(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    src = _copy(tiny_models["mixtral"].hf_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match=r"config\.json: unsupported architecture model_type='llama'"):
        pack(src, tmp_path / "out", progress=False)


def test_not_a_packed_dir_and_missing_source(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="not a packed MoE directory"):
        MoEModel.open(tmp_path)
    with pytest.raises(PackError, match=r"no config\.json"):
        pack(tmp_path, tmp_path / "out", progress=False)


def test_pack_cli_int8_and_error_message(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    r = CliRunner().invoke(pack_main, ["pack", str(tiny_models["olmoe"].hf_dir), str(tmp_path / "p"),
                                       "--quant", "int8", "--group-size", "32", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "packed olmoe" in r.output
    m = read_manifest(tmp_path / "p")
    assert m.quant == "int8" and m.stride % 4096 == 0
    assert all(m.expert_offset(layer, e) % 4096 == 0 for layer in m.moe_layers for e in range(m.num_experts))
    r = CliRunner().invoke(pack_main, ["pack", str(tmp_path), str(tmp_path / "q")])
    assert r.exit_code != 0 and "no config.json" in r.output
