"""`local-engine` CLI: info on a packed dir without a tokenizer, pack's group-size message, --stats layout.

The model is a tiny `demo-moe` checkpoint (random Qwen3-MoE, widths 96 and 160: not multiples of
the default group size 64).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from local_engine.cli import main
from local_engine.demo_moe import DemoShape, write_demo_moe
from local_engine.formats.pack_writer import pack
from local_engine.formats.sources import TOKENIZER_FILES


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("demo") / "src"
    write_demo_moe(src, DemoShape(layers=2, experts=4, top_k=2, hidden_size=96, moe_intermediate_size=160))
    return src


@pytest.fixture(scope="module")
def packed(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("packed") / "p"
    pack(demo, dst, quant="int8", group_size=32, progress=False)
    return dst


def test_info_on_a_packed_dir_needs_no_tokenizer(packed: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in packed.iterdir():
        if f.name not in TOKENIZER_FILES:
            (bare / f.name).symlink_to(f)
    r = CliRunner().invoke(main, ["info", str(bare)])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == "flash-moe-pack" and info["arch"] == "qwen3_moe"
    assert (info["layers"], info["experts"], info["top_k"], info["hidden_size"]) == (2, 4, 2, 96)
    assert info["quant"] == "int8" and info["group_size"] == 32 and info["tokenizer"] is None
    with_tok = json.loads(CliRunner().invoke(main, ["info", str(packed)]).stdout)
    assert with_tok["tokenizer"] == str(packed / "tokenizer.json")


def test_pack_says_which_group_size_fits(demo: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["pack", str(demo), str(tmp_path / "a"), "--quant", "int8", "--no-progress"])
    assert r.exit_code == 1
    assert "hidden size 96" in r.output and "use --group-size 32" in r.output, r.output
    assert "Traceback" not in r.output
    # ... and the value it names works.
    r = CliRunner().invoke(main, ["pack", str(demo), str(tmp_path / "a"), "--quant", "int8", "--group-size", "32",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["pack", str(demo), str(tmp_path / "b"), "--quant", "int4", "--group-size", "5",
                                  "--no-progress"])
    assert r.exit_code == 1 and "must be even" in r.output and "use --group-size 4" in r.output, r.output


def test_generate_stats_are_on_their_own_lines_on_stderr(packed: Path) -> None:
    r = CliRunner().invoke(main, ["generate", str(packed), "--prompt", "What is the capital", "--max-tokens", "5",
                                  "--memory-budget", "0", "--stats"])
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("\n") and "tok/s" not in r.stdout
    # As a terminal shows both streams: the text, then each stats line starting a line of its own.
    head = re.search(r"^prompt \d+ tok, prefill [\d.]+ tok/s \| completion 5 tok", r.output, re.M)
    assert head and r.output[:head.start()] == r.stdout, r.output
    extra = json.loads(r.stderr.splitlines()[-1])
    assert extra["decode_tokens"] == 4
