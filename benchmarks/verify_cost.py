"""What a speculative verify costs on the dense built-in model: an m-row ``verify_forward`` after 300
cached tokens against a single decode step, m = 1..16, best of 5 rounds of 5 (1 thread).

``speculative: auto`` measures this curve itself while decoding (local_engine/spec_control.py);
this prints it for the docs. It is a staircase (the kernel's row tiles), not a line.

    /work/bin/benchslot env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/verify_cost.py

``--moe DIR`` does the same for a packed MoE, cold, at expert budgets ``--fractions`` of its bank,
and prints beside each measured size what ``auto``'s prior predicted for it before (``MoEModel.
verify_cost_prior``: the union of recent positions' experts and a step's expert share of time).
Each size is timed after a step (its baseline: same cache state), over random draft tokens, and
cropped away; the cache warms as it goes, as a decode's does.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch

from local_engine.engine import Engine
from local_engine.models.layers import KVCache
from local_engine.models.llama import LlamaModel


def moe(packed: Path, fractions: list[float], rounds: int) -> None:
    from local_engine.formats.pack import read_manifest
    from local_engine.models.moe import MoEModel

    man = read_manifest(packed)
    vocab = int(man.config["vocab_size"])
    rng = random.Random(0)
    sizes = (2, 3, 4, 6, 8, 12, 16)
    print(f"# {packed}: m-row verify_forward / the step before it (same cache state), cold, "
          f"median of {rounds}; prior: verify_cost_prior just before; load {os.getloadavg()[0]:.1f}")
    for frac in fractions:
        for f in packed.iterdir():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        m = MoEModel.open(packed, memory_budget=int(frac * man.expert_bank_bytes), prefetch=False)
        cache = m.new_cache()
        got: dict[int, list[tuple[float, float]]] = {r: [] for r in sizes}
        with torch.inference_mode():
            tok = int(m.forward(torch.tensor([rng.randrange(vocab) for _ in range(48)]), cache, last_only=True)[-1].argmax())
            for _ in range(4):
                tok = int(m.forward(torch.tensor([tok]), cache, last_only=True)[-1].argmax())
            for _ in range(rounds):
                for rows in sizes:
                    prior = m.verify_cost_prior(17)
                    t = time.perf_counter()
                    tok = int(m.forward(torch.tensor([tok]), cache, last_only=True)[-1].argmax())
                    step = time.perf_counter() - t
                    base = cache.length
                    t = time.perf_counter()
                    m.verify_forward(torch.tensor([tok] + [rng.randrange(vocab) for _ in range(rows - 1)]), cache)
                    got[rows].append(((time.perf_counter() - t) / step, prior[rows] if prior else 0.0))
                    cache.crop(base)
        st = m.stats()
        m.close()
        print(f"budget {frac:.0%}: expert share of a step {m.expert_share:.2f}, hit rate {st['hit_rate']:.2f}  "
              + "  ".join(f"{r}: {sorted(x for x, _ in v)[len(v) // 2]:.2f} (prior {sorted(p for _, p in v)[len(v) // 2]:.2f})"
                          for r, v in got.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe", type=Path, default=None, help="a packed MoE dir instead of the built-in dense model")
    ap.add_argument("--fractions", default="0.05,0.15,0.5")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.moe is not None:
        moe(a.moe, [float(f) for f in a.fractions.split(",")], a.rounds)
        return
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
