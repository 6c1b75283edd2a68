"""What a speculative verify costs on the dense built-in model: an m-row ``verify_forward`` after 300
cached tokens against a single decode step, m = 1..16, best of 5 rounds of 5 (1 thread).

``speculative: auto`` measures this curve itself while decoding (local_engine/spec_control.py);
this prints it for the docs. It is a staircase (the kernel's row tiles), not a line.

    /work/bin/benchslot env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/verify_cost.py
"""

from __future__ import annotations

import time

import torch

from local_engine.engine import Engine
from local_engine.models.layers import KVCache
from local_engine.models.llama import LlamaModel


def main() -> None:
    torch.set_num_threads(1)
    eng = Engine.open("builtin:smollm2-135m", threads=1, prefix_cache_mb=0)
    m = eng.model
    assert isinstance(m, LlamaModel)
    ids = eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 30)[:300]
    cache = m.new_cache()
    assert isinstance(cache, KVCache)  # the default f32 cache: the decode step's fused path
    best: dict[int, float] = {}
    with torch.inference_mode():
        m.forward(torch.tensor(ids), cache, last_only=True)
        base = cache.length
        for _ in range(5):
            for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16):
                t = time.perf_counter()
                for _ in range(5):
                    if rows == 1:
                        m.forward(torch.tensor([5]), cache, last_only=True)
                    else:
                        m.verify_forward(torch.tensor([5] * rows), cache)
                    cache.crop(base)
                best[rows] = min(best.get(rows, 1e9), (time.perf_counter() - t) / 5)
    for rows, s in best.items():
        print(rows, f"{s * 1e3:.2f} ms", f"{s / best[1]:.2f} steps")


if __name__ == "__main__":
    main()
