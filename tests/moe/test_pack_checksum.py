"""Pack checksums (issue #24): new packs record crc32c (format version 2); version 1 packs, whose
manifests carry zlib crc32s, still open and verify; corruption is caught under either."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import crc32c
import pytest
import torch

from local_engine.errors import PackError
from local_engine.formats.pack import read_manifest
from local_engine.models.moe import MoEModel
from tests.moe.conftest import PROMPT, Tiny


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _as_version1(d: Path) -> None:
    """Rewrite d's manifest as a version 1 pack has it: no "checksum" field, zlib crc32s under
    "crc32", computed here from the data files' bytes (the data layout is unchanged since v1)."""
    mpath = d / "manifest.json"
    raw = json.loads(mpath.read_text())
    res = (d / "resident.bin").read_bytes()
    for t in raw["resident"]["tensors"].values():
        del t["crc32c"]
        t["crc32"] = zlib.crc32(res[t["offset"]:t["offset"] + t["nbytes"]])
    ex = raw["experts"]
    data = (d / "experts.bin").read_bytes()
    ex["crc32"] = [zlib.crc32(data[i * ex["stride"]:i * ex["stride"] + ex["bundle_nbytes"]])
                   for i in range(len(ex.pop("crc32c")))]
    del raw["checksum"]
    raw["version"] = 1
    mpath.write_text(json.dumps(raw))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _logits(d: Path, verify: str) -> torch.Tensor:
    model = MoEModel.open(d, memory_budget=0, verify=verify, prefetch=False)
    try:
        return model.logits(PROMPT)
    finally:
        model.close()


def test_new_packs_record_crc32c_of_every_bundle_and_tensor(tiny_models: dict[str, Tiny]) -> None:
    d = tiny_models["qwen3_moe"].packed["int4"]
    m = read_manifest(d)
    assert (m.raw["version"], m.checksum) == (2, "crc32c")
    assert "crc32" not in m.raw["experts"]
    data = (d / "experts.bin").read_bytes()
    for layer in m.moe_layers:
        for e in range(m.num_experts):
            off = m.expert_offset(layer, e)
            assert m.expert_crc(layer, e) == crc32c.crc32c(data[off:off + m.bundle_nbytes])
    res = (d / "resident.bin").read_bytes()
    for name, t in m.raw["resident"]["tensors"].items():
        assert m.tensor_crc(name) == crc32c.crc32c(res[t["offset"]:t["offset"] + t["nbytes"]])


def test_version1_pack_opens_verifies_and_decodes_the_same(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    src = tiny_models["qwen3_moe"].packed["int4"]
    d = _copy(src, tmp_path / "v1")
    _as_version1(d)
    m = read_manifest(d)
    assert (m.raw["version"], m.checksum) == (1, "crc32")
    assert torch.equal(_logits(d, "always"), _logits(src, "always"))


@pytest.mark.parametrize("version", [1, 2])
def test_corrupt_bundle_is_caught_on_first_read(tiny_models: dict[str, Tiny], tmp_path: Path, version: int) -> None:
    d = _copy(tiny_models["qwen3_moe"].packed["int4"], tmp_path / "p")
    if version == 1:
        _as_version1(d)
    m = read_manifest(d)
    for slot in range(m.num_bundles):  # whichever expert is routed first trips the check
        _flip_byte(d / "experts.bin", slot * m.stride + m.bundle_nbytes // 2)
    with pytest.raises(PackError, match=r"experts\.bin: checksum mismatch for layer \d+ expert \d+"):
        _logits(d, "first")  # the engine's default


@pytest.mark.parametrize("version", [1, 2])
def test_corrupt_resident_tensor_is_caught_at_open(tiny_models: dict[str, Tiny], tmp_path: Path, version: int) -> None:
    d = _copy(tiny_models["qwen3_moe"].packed["int4"], tmp_path / "p")
    if version == 1:
        _as_version1(d)
    m = read_manifest(d)
    name, t = next(iter(m.raw["resident"]["tensors"].items()))
    _flip_byte(d / "resident.bin", t["offset"] + t["nbytes"] - 1)
    with pytest.raises(PackError, match=rf"resident\.bin: checksum mismatch in resident tensor {name}"):
        MoEModel.open(d)


def test_unknown_or_missing_checksum_is_a_clear_error(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    d = _copy(tiny_models["qwen3_moe"].packed["int4"], tmp_path / "p")
    mpath = d / "manifest.json"
    raw = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**raw, "checksum": "md5"}))
    with pytest.raises(PackError, match=r"manifest\.json: checksum 'md5' unsupported"):
        read_manifest(d)
    mpath.write_text(json.dumps({k: v for k, v in raw.items() if k != "checksum"}))  # v2 must name it
    with pytest.raises(PackError, match=r"manifest\.json: checksum 'None' unsupported"):
        read_manifest(d)
    mpath.write_text(json.dumps({**raw, "experts": {k: v for k, v in raw["experts"].items() if k != "crc32c"}}))
    with pytest.raises(PackError, match=r"manifest\.json: experts carry no 'crc32c' checksums"):
        read_manifest(d)
    mpath.write_text(json.dumps({**raw, "version": 3}))
    with pytest.raises(PackError, match=r"format version 3 unsupported"):
        read_manifest(d)
