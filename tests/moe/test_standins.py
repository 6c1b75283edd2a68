"""Low-bit stand-ins (HOBBIT): a decode step's missed expert computed from another pack's bundle.

The stand-in path must compute exactly what the stand-in pack computes on its own, serve only
the experts the rule lets it (missed ones, router weight below the threshold), count each use,
and refuse a pack of another model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from local_engine.errors import PackError
from local_engine.formats.pack_writer import pack
from local_engine.models.moe import MoEModel
from local_engine.models.moe_route import standin_candidates
from tests.moe.conftest import Tiny

ARCH = "qwen2_moe"  # shared expert + a dense layer: the stand-in path keeps both


@pytest.fixture(scope="module")
def int2_pack(tiny_models: dict[str, Tiny], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("standins")
    return pack(tiny_models[ARCH].hf_dir, root / "int2", quant="int2", group_size=32, progress=False).root


def _decode(m: MoEModel, first: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy from a one-token prompt, so every forward is a one-token (decode-path) step."""
    cache: Any = m.new_cache(64)
    tok, toks, logits = first, [], []
    for _ in range(steps):
        lg = m.forward(torch.tensor([tok]), cache)[-1]
        logits.append(lg)
        tok = int(lg.argmax())
        toks.append(tok)
    return toks, logits


def test_rule_is_the_router_weight_below_the_threshold() -> None:
    assert standin_candidates([3, 9, 1], [0.5, 0.05, 0.1], 0.1) == {9}
    assert standin_candidates([3, 9], [0.5, 0.05], 0.0) == set()
    assert standin_candidates([3, 9], [0.5, 0.05], 1.0) == {3, 9}


def test_every_miss_stood_in_computes_the_stand_in_pack(tiny_models: dict[str, Tiny], int2_pack: Path) -> None:
    """int4 pack + int2 stand-ins at threshold 1 with no cache (every expert misses) is the int2
    pack's own model, logit for logit; at threshold 0 it is the int4 pack's; the uses are counted."""
    int4 = tiny_models[ARCH].packed["int4"]
    steps = 6
    runs = {}
    settings: tuple[tuple[str, Path, dict[str, Any]], ...] = (
        ("all", int4, {"standins": int2_pack, "standin_below": 1.0}),
        ("none", int4, {"standins": int2_pack, "standin_below": 0.0}),
        ("int2", int2_pack, {}), ("int4", int4, {}))
    for name, path, kw in settings:
        m = MoEModel.open(path, memory_budget=0, prefetch=False, **kw)
        try:
            runs[name] = (*_decode(m, 5, steps), m.stats(), len(m.moe_layers), m.top_k)
        finally:
            m.close()
    for a, b in (("all", "int2"), ("none", "int4")):
        assert runs[a][0] == runs[b][0]
        for x, y in zip(runs[a][1], runs[b][1], strict=True):
            assert torch.equal(x, y)
    assert runs["int2"][0] != runs["int4"][0] or not all(
        torch.equal(x, y) for x, y in zip(runs["int2"][1], runs["int4"][1], strict=True))
    stats_all, n_moe, k = runs["all"][2], runs["all"][3], runs["all"][4]
    assert stats_all["standin_uses"] == steps * n_moe * k == stats_all["store_standin_uses"]
    assert runs["none"][2]["standin_uses"] == 0
    # a stand-in read is a read: its bytes count, as the stand-in pack's own reads would
    assert stats_all["store_bytes_read"] == runs["int2"][2]["store_bytes_read"] > 0


def test_only_light_misses_are_stood_in(tiny_models: dict[str, Tiny], int2_pack: Path) -> None:
    """With a cache, hits keep their own bundle; only misses under the threshold use stand-ins."""
    m = MoEModel.open(tiny_models[ARCH].packed["int4"], memory_budget="unlimited", prefetch=False,
                      standins=int2_pack, standin_below=0.3)
    try:
        _decode(m, 5, 8)
        s = m.stats()
        misses, uses = s["store_cache_misses"], s["standin_uses"]
        assert 0 < uses < misses  # some misses were heavy enough to read their own bundle
        assert m.describe()["standins"] == "int2"
    finally:
        m.close()


def test_a_stand_in_pack_of_another_model_is_refused(tiny_models: dict[str, Tiny]) -> None:
    other = tiny_models["mixtral"].packed["int4"]
    with pytest.raises(PackError, match="cannot stand in"):
        MoEModel.open(tiny_models[ARCH].packed["int4"], memory_budget=0, standins=other)
    with pytest.raises(PackError, match="stand-ins must be int2 or int4"):
        MoEModel.open(tiny_models[ARCH].packed["int4"], memory_budget=0, standins=tiny_models[ARCH].packed["int8"])
    with pytest.raises(ValueError, match="standin_below"):
        MoEModel.open(tiny_models[ARCH].packed["int4"], memory_budget=0, standins=other, standin_below=2.0)


def test_cli_and_policy_turn_stand_ins_on(tiny_models: dict[str, Tiny], int2_pack: Path) -> None:
    """`local-engine generate --standins ... --stats` reports the uses; the policy key reaches the engine."""
    import asyncio
    import json

    from click.testing import CliRunner

    from gateway.backends.engine_backend import EngineBackend
    from gateway.policy.targets import LocalTarget
    from gateway.runtime import build_backend
    from local_engine.cli import main

    int4 = str(tiny_models[ARCH].packed["int4"])
    r = CliRunner().invoke(main, ["generate", int4, "--prompt", "w5 w9 w3", "--max-tokens", "6", "--memory-budget", "0",
                                  "--standins", str(int2_pack), "--standin-below", "1", "--stats"])
    assert r.exit_code == 0, r.output
    extra = json.loads(r.stderr.strip().splitlines()[-1])
    assert extra["standin_uses"] > 0 and extra["standin_below"] == 1.0
    bad = CliRunner().invoke(main, ["generate", int4, "--prompt", "w5", "--standins", str(int2_pack),
                                    "--standin-below", "3"])
    assert bad.exit_code != 0 and "--standin-below" in bad.output

    cfg = LocalTarget(kind="local", engine="local_engine", model_path=int4, memory_budget="0",
                      standins={"pack": str(int2_pack), "below": 0.5})
    backend = build_backend("moe", cfg)
    assert isinstance(backend, EngineBackend)
    backend.load()
    try:
        assert backend.engine.model.standin_below == 0.5
        assert backend.engine.model.describe()["standins"] == "int2"
    finally:
        asyncio.run(backend.aclose())
