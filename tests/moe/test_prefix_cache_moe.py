"""The prefix cache on the MoE engine: a hit reuses the kept prompt and answers as a fresh run does.

Not bitwise, unlike the dense engine (tests/engine/test_prefix_cache.py): an expert's matmul takes
the rows the router sent it within the chunk, so a row's M differs between a fresh run and a hit,
and the fp32 GEMM (int8 / none packs) and the one-row kernel (int4 / int2) sum differently at
different M. Measured on these tiny packs: <= 3e-6 (int8), <= 1.6e-4 (int4) over logits ranging ~10.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from local_engine.engine import Engine
from local_engine.models.layers import ATTN_GROUP

ATOL = {"int8": 1e-4, "int4": 2e-3}
PROMPT = " ".join(f"w{(i * 7) % 120 + 3}" for i in range(300))


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_moe_hit_matches_a_fresh_run(tiny_models: dict[str, Any], q: str) -> None:
    eng = Engine.open(tiny_models["qwen2_moe"].packed[q], memory_budget="unlimited", threads=1)
    fresh = Engine.open(tiny_models["qwen2_moe"].packed[q], memory_budget="unlimited", threads=1, prefix_cache_mb=0)
    try:
        first = eng.generate(PROMPT, max_tokens=8, temperature=0)
        text = "".join(first)
        n = len(first.prompt_ids)
        again = eng.generate(PROMPT + " w5 w6", max_tokens=8, temperature=0)
        assert "".join(again) == "".join(fresh.generate(PROMPT + " w5 w6", max_tokens=8, temperature=0))
        assert again.stats.cached_tokens == (n - n % ATTN_GROUP) > 0
        assert text == "".join(fresh.generate(PROMPT, max_tokens=8, temperature=0))
        ids = again.prompt_ids
        m = eng.model
        with torch.inference_mode():
            cache, k = eng.prefix_cache.take(ids, m.new_cache)
            got = m.forward(torch.tensor(ids[k:]), cache)
            want = m.forward(torch.tensor(ids), m.new_cache())[k:]
        assert k > 0 and (got - want).abs().max().item() < ATOL[q]
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    finally:
        eng.close()
        fresh.close()
