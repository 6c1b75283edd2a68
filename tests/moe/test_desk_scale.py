"""benchmarks/desk_scale.py writes packs directly (no checkpoint round trip): they must be packs the
engine reads as any other, checksums and all, and the script must run end to end and clean up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import desk_scale  # noqa: E402

from local_engine.formats.pack import read_manifest  # noqa: E402
from local_engine.models.moe import MoEModel  # noqa: E402


def test_written_pack_opens_verifies_and_decodes(tmp_path: Path) -> None:
    cfg = desk_scale.config(layers=2, experts=6, hidden=128, width=64, top_k=2)
    desk_scale.write_pack(tmp_path / "p", cfg, group=64, pool=4, seed=0, progress=False)
    m = read_manifest(tmp_path / "p")
    assert (m.quant, m.num_experts, m.moe_layers) == ("int4", 6, [0, 1])
    assert m.expert_crc(1, 5) == m.expert_crc(0, 3)  # bundle 11 and bundle 3 are pool[3]
    assert m.expert_crc(0, 0) != m.expert_crc(0, 1)
    model = MoEModel.open(tmp_path / "p", memory_budget="unlimited", verify="always", prefetch=False)
    try:
        logits = model.logits([1, 2, 3])
        assert logits.shape == (3, 512) and torch.isfinite(logits).all()
        assert len(list(model.generate_ids([1, 2], 3))) == 3
        # every bundle the decode read was checked against the manifest's crc32 (verify="always")
        assert model.stats()["store_bytes_read"] > 0
    finally:
        model.close()


def test_corrupt_bundle_is_caught(tmp_path: Path) -> None:
    cfg = desk_scale.config(layers=1, experts=4, hidden=128, width=64, top_k=4)
    desk_scale.write_pack(tmp_path / "p", cfg, group=64, pool=4, seed=0, progress=False)
    m = read_manifest(tmp_path / "p")
    with open(tmp_path / "p" / "experts.bin", "r+b") as f:
        f.seek(m.expert_offset(0, 2) + 10)
        f.write(b"\xff\x00\xff")
    model = MoEModel.open(tmp_path / "p", memory_budget="unlimited", verify="always", prefetch=False)
    try:
        with pytest.raises(Exception, match="checksum mismatch"):
            model.logits([1])  # top-4 of 4: every expert is read
    finally:
        model.close()


@pytest.mark.slow
def test_smoke_run_prints_the_table_and_deletes_the_pack(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "desk_scale.py"), "--size-gb", "0.02",
                        "--layers", "2", "--hidden", "256", "--expert-width", "128", "--top-k", "2", "--tokens", "3",
                        "--ceiling-s", "0.2", "--verify", "first", "--no-progress", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| first |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) > 0  # decode tok/s
    assert not (tmp_path / "pack").exists()


def test_version1_twin_shares_the_data_and_verifies_with_crc32(tmp_path: Path) -> None:
    cfg = desk_scale.config(layers=1, experts=4, hidden=128, width=64, top_k=4)
    desk_scale.write_pack(tmp_path / "p", cfg, group=64, pool=3, seed=0, progress=False, v1_twin=tmp_path / "v1")
    new, old = read_manifest(tmp_path / "p"), read_manifest(tmp_path / "v1")
    assert (new.raw["version"], new.checksum, old.raw["version"], old.checksum) == (2, "crc32c", 1, "crc32")
    assert (tmp_path / "v1" / "experts.bin").samefile(tmp_path / "p" / "experts.bin")
    assert old.expert_crc(0, 3) == old.expert_crc(0, 0) != new.expert_crc(0, 0)  # pool of 3 repeats
    logits = []
    for d in ("p", "v1"):
        model = MoEModel.open(tmp_path / d, memory_budget="unlimited", verify="always", prefetch=False)
        try:
            logits.append(model.logits([1, 2]))
        finally:
            model.close()
    assert torch.equal(*logits)
    with open(tmp_path / "p" / "experts.bin", "r+b") as f:  # one inode: both packs see it
        f.seek(new.expert_offset(0, 1) + 10)
        f.write(b"\xff\x00\xff")
    for d in ("p", "v1"):
        model = MoEModel.open(tmp_path / d, memory_budget="unlimited", prefetch=False)  # verify="first"
        try:
            with pytest.raises(Exception, match="checksum mismatch for layer 0 expert 1"):
                model.logits([1])
        finally:
            model.close()
