"""docs/moe.md's offline walk-through, through the CLI: demo-moe -> pack -> info -> generate.

`demo-moe` writes its checkpoint without transformers; transformers then reads it as the
Qwen3-MoE it claims to be, and computes the same logits as the packed dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from local_engine.cli import main


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo-walk")
    src, packed = root / "demo", root / "packed"
    r = CliRunner().invoke(main, ["demo-moe", str(src)])
    assert r.exit_code == 0, r.output
    assert "wrote qwen3_moe: 4 layers x 16 experts (top-4)" in r.stdout
    assert "layer/s" in r.stderr  # the house progress bar, as pack's
    r = CliRunner().invoke(main, ["pack", str(src), str(packed), "--quant", "int8"])
    assert r.exit_code == 0, r.output
    return {"src": src, "packed": packed}


def test_walk_through_info_and_generate(walk: dict[str, Path]) -> None:
    r = CliRunner().invoke(main, ["info", str(walk["packed"])])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["arch"], info["experts"], info["top_k"], info["quant"]) == ("qwen3_moe", 16, 4, "int8")
    assert info["tokenizer"]
    r = CliRunner().invoke(main, ["generate", str(walk["packed"]), "--chat", "What is the capital of France?",
                                  "--max-tokens", "8", "--memory-budget", "1MiB", "--stats"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()
    extra = json.loads(r.stderr.splitlines()[-1])
    assert extra["store_cache_budget_bytes"] == 2**20 and extra["store_reads"] > 0  # streamed from disk


def test_demo_is_deterministic_and_its_tokenizer_round_trips(walk: dict[str, Path], tmp_path: Path) -> None:
    from local_engine.tokenizer import from_hf_dir

    again = tmp_path / "again"
    r = CliRunner().invoke(main, ["demo-moe", str(again), "--no-progress"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (walk["src"] / name).read_bytes(), name
    tok = from_hf_dir(walk["packed"])
    text = "Héllo, wörld! What is 2+2? 東京"  # byte-level: any text, not only the training sentences
    assert tok.decode(tok.encode(text)) == text
    assert tok.chat_template and tok.eos_id == tok.tok.token_to_id("<|im_end|>") and tok.eos_id in tok.stop_ids


@pytest.mark.slow
def test_transformers_reads_the_demo_as_the_packed_engine_computes_it(walk: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    import transformers

    from local_engine.formats.pack_writer import pack
    from local_engine.models.moe import MoEModel

    hf = transformers.AutoModelForCausalLM.from_pretrained(walk["src"]).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    lossless = tmp_path / "none"
    pack(walk["src"], lossless, quant="none", progress=False)
    ids = [5, 17, 99, 3, 64, 8, 120, 42]
    m = MoEModel.open(lossless, memory_budget=0)
    try:
        ours = m.logits(ids)
    finally:
        m.close()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
