"""Prompt-lookup speculative decoding on the dense built-in model (issue #20, first slice).

Decode tok/s with ``speculative`` off / prompt-lookup / auto, greedy, on (a) a quoting workload
(edit or copy a given public-domain text: the answer repeats its prompt) and (b) open chat. Each
prompt runs in every mode, interleaved (off, prompt-lookup, auto, then again) so drift on a busy
box hits the modes alike; a mode's figure is its generated tokens over its decode seconds, summed
over the workload's prompts, best of --repeat rounds. The greedy answers of the three modes must
be identical (checked: "same" column). Prefix cache off, so every run prefills alike.

    flock /tmp/bench.lock env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/speculative.py \\
        | tee benchmarks/results/speculative.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from local_engine.engine import Engine

DATA = Path(__file__).parent / "data" / "quality"


def _paragraphs() -> list[str]:
    text = (DATA / "gettysburg_address.txt").read_text()
    decl = (DATA / "declaration_of_independence.txt").read_text()
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    paras += [p.strip() for p in decl.split("\n\n") if 300 < len(p.strip()) < 900][:2]
    return paras[:3]


def workloads() -> dict[str, list[str]]:
    paras = _paragraphs()
    quoting = [f"Rewrite this text in modern English spelling, changing as little as possible:\n\n{paras[0]}",
               f"Copy this text, putting each sentence on its own line:\n\n{paras[1 % len(paras)]}",
               f"Repeat this passage exactly, then say who wrote it:\n\n{paras[2 % len(paras)]}"]
    chat = ["Give me three tips for sleeping better.",
            "Write a short poem about a cat watching the rain.",
            "What should I pack for a weekend hiking trip?"]
    return {"quoting": quoting, "chat": chat}


def run(eng: Engine, prompt: str, mode: str, max_tokens: int) -> dict[str, Any]:
    gen = eng.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, speculative=mode)
    text = "".join(gen)
    return {"text": text, "tokens": gen.stats.completion_tokens - 1, "decode_s": gen.stats.decode_s,
            **{k: v for k, v in gen.stats.extra.items() if k.startswith("spec_")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    eng = Engine.open(a.model, threads=a.threads, prefix_cache_mb=0)
    modes = ("off", "prompt-lookup", "auto")
    print(f"# benchmarks/speculative.py --max-tokens {a.max_tokens} --repeat {a.repeat} --threads {a.threads}"
          f"  ({a.model}, greedy)")
    print(f"{'workload':<9} {'mode':<14} {'tok/s':>7} {'vs off':>7} {'accept':>7} {'tok/fwd':>8} "
          f"{'drafted':>8} {'same':>5}")
    t_all = time.perf_counter()
    for name, prompts in workloads().items():
        best: dict[str, float] = {}
        last: dict[str, list[dict[str, Any]]] = {}
        for _ in range(a.repeat):
            rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for p in prompts:
                for m in modes:
                    rows[m].append(run(eng, p, m, a.max_tokens))
            for m in modes:
                tok_s = sum(r["tokens"] for r in rows[m]) / sum(r["decode_s"] for r in rows[m])
                best[m] = max(best.get(m, 0.0), tok_s)
            last = rows
        for m in modes:
            rs = last[m]
            drafted, accepted = sum(r["spec_drafted"] for r in rs), sum(r["spec_accepted"] for r in rs)
            verifies = sum(r["spec_verifies"] for r in rs)
            steps = sum(r["tokens"] for r in rs) - accepted - verifies  # forwards that were single steps
            fwd = (verifies + max(steps, 0))
            same = all(r["text"] == o["text"] for r, o in zip(rs, last["off"], strict=True))
            print(f"{name:<9} {m:<14} {best[m]:>7.1f} {best[m] / best['off']:>6.2f}x "
                  f"{(accepted / drafted if drafted else 0):>7.0%} {(fwd + accepted) / fwd if fwd else 0:>8.2f} "
                  f"{drafted:>8} {'yes' if same else 'NO':>5}")
            sys.stdout.flush()
    print(f"# {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
