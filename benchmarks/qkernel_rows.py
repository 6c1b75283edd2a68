"""qkernel's several-row path against a baseline revision's, in one process, on the built-in model.

A speculative verify multiplies k+1 activation rows at once; what it costs against single steps
decides whether drafting pays (local_engine/speculative.py). This loads ``local_engine/qkernel.py`` (and
``csrc/qkernel.c``) as it was at ``--baseline`` (a git revision) next to the working tree's, points every matrix of
the built-in SmolLM2-135M at one or the other, and interleaves them: prefill tok/s (97 tokens),
decode tok/s, a 5- and a 9-token verify in single steps, each matrix kind's time at M rows
(all 30 layers, so weights stream from memory as in decode), and the batched decode step
(``LlamaModel.step_batch``: B sequences' tokens in one step, continuous batching's unit) at
B = 1 / 2 / 4 / 8. Best of --rounds; 1 thread. Times are this thread's CPU time
(``time.thread_time``): on a 2-core box shared with other sessions, wall time mostly measured
who else was running; CPU time still feels their memory traffic, not their preemption.

    /work/bin/benchslot env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/qkernel_rows.py \\
        --baseline 64ffb00 | tee benchmarks/results/qkernel_rows.txt

``--experts`` times only the decode step's expert call instead (``qkernel.gq_expert``: one int4 /
int2 expert of benchmarks/moe_stream.py's model, gate|up 640x768 + down 768x320, groups of 64, one
token), per call, over a bank of 4 experts (in cache) and of 256 (~100 MB int4: streamed from
L3/memory, as a warm decode step's experts are), baseline and this tree interleaved.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path
from time import thread_time as clock
from typing import Any

import torch

from local_engine import qkernel
from local_engine.engine import Engine

ROOT = Path(__file__).resolve().parent.parent


def baseline_lib(rev: str) -> Any:
    def show(path: str) -> str | None:
        out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else None

    src = show("local_engine/qkernel.py")
    if src is None:
        raise SystemExit(f"no local_engine/qkernel.py at {rev}")
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "qkernel_baseline.py"
        path.write_text(src)
        c_src = show("local_engine/csrc/qkernel.c")  # from e3b8a57's successors on, the C source is its own file
        if c_src is not None:
            (Path(td) / "csrc").mkdir()
            (Path(td) / "csrc" / "qkernel.c").write_text(c_src)
        spec = importlib.util.spec_from_file_location("qkernel_baseline", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        lib = mod.load()
    if lib is None:
        raise SystemExit(f"baseline qkernel did not build: {mod.unavailable_reason}")
    try:
        lib.attn_step_v  # noqa: B018  (a revision before the 8-lane attention: its decode step is the scalar one)
    except AttributeError:
        lib.attn_step_v = lib.attn_step
    try:
        lib.attn_rows  # noqa: B018
    except AttributeError:  # before one call per layer: a call per sequence, as step_batch made then
        lib.attn_rows = _attn_rows_by_sequence(lib)
    return lib


def _attn_rows_by_sequence(lib: Any) -> Any:
    """qkernel.attn_rows's signature over a revision's per-sequence attn_step."""
    import ctypes

    def attn_rows(B: int, r: int, rstride: int, cos: int, sin: int, kv: int, pos: int, ms: int, hq: int, hk: int,
                  hd: int, scale: float, out: int, ostride: int, scores: int) -> None:
        cs, sn, kvs = ((ctypes.c_int64 * B).from_address(a) for a in (cos, sin, kv))
        ps = (ctypes.c_int32 * B).from_address(pos)
        for b in range(B):
            lib.attn_step(r + 4 * b * rstride, cs[b], sn[b], kvs[b], ps[b], ms, hq, hk, hd, scale,
                          out + 4 * b * ostride, scores)

    return attn_rows


def _expert_bundle(bits: int, hidden: int, inter: int, group: int) -> tuple[bytearray, dict[str, int]]:
    """A random expert's bundle as formats/pack lays one out: each part's bytes at its offset."""
    from local_engine.formats.pack_quant import quantize, quantize_int2

    gen = torch.Generator().manual_seed(bits)
    buf, offsets = bytearray(), {}
    for name, shape in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
        w = torch.randn(shape, generator=gen) * 0.05
        parts = (dict(zip((name, f"{name}.scale", f"{name}.min"), quantize_int2(w, group), strict=True)) if bits == 2
                 else dict(zip((name, f"{name}.scale"), quantize(w, "int4", group), strict=True)))
        for part, t in parts.items():
            offsets[part] = len(buf)
            buf += t.contiguous().view(torch.uint8).numpy().tobytes()
    return buf, offsets


def expert_table(libs: dict[str, Any], rounds: int) -> None:
    from local_engine.quant import GroupExpert

    hidden, inter, group = 768, 320, 64
    print(f"# gq_expert, one token, {hidden}x{inter} expert, groups of {group}: us per call (best of {rounds}), "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'experts':<8} {'bank':>5} {'baseline us':>12} {'this us':>8} {'speed-up':>9}")
    x, y = torch.randn(hidden), torch.empty(hidden)
    for bits in (4, 2):
        buf, offsets = _expert_bundle(bits, hidden, inter, group)
        fns = {k: GroupExpert(lib, f"int{bits}", offsets, hidden, inter, group) for k, lib in libs.items()}
        for n in (4, 256):
            bank = [bytearray(buf) for _ in range(n)]
            best = {k: float("inf") for k in libs}
            for _ in range(rounds):
                for k, fn in fns.items():
                    reps = max(1, 1024 // n)
                    t = clock()
                    for _ in range(reps):
                        for b in bank:
                            fn(b, x, 0.5, y)
                    best[k] = min(best[k], (clock() - t) / (reps * n))
            print(f"{'int' + str(bits):<8} {n:>5} {best['baseline'] * 1e6:>12.1f} {best['this'] * 1e6:>8.1f} "
                  f"{best['baseline'] / best['this']:>8.2f}x")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision whose qkernel.py is the baseline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--experts", action="store_true", help="time only the one-token expert call (gq_expert)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    libs = {"baseline": baseline_lib(a.baseline), "this": qkernel.load()}
    if a.experts:
        expert_table(libs, a.rounds)
        return
    eng = Engine.open("builtin:smollm2-135m", threads=1, prefix_cache_mb=0)
    model: Any = eng.model  # a LlamaModel: this instrument swaps its kernels (_qlib, each matrix's _fn)
    kinds = {"qkv": [L.qkv for L in model.layers], "o": [L.o for L in model.layers],
             "gate_up": [L.gate_up for L in model.layers], "down": [L.down for L in model.layers],
             "head": [model.head]}
    lins = [lin for group in kinds.values() for lin in group]

    def use(name: str) -> None:
        for lin in lins:
            lin._fn = libs[name].qmatmul
        model._qlib = libs[name]

    ids = torch.tensor(eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 30)[:97])
    res: dict[str, dict[str, list[float]]] = {k: {} for k in libs}
    ms = (1, 2, 3, 4, 6, 8, 9, 16)
    batches = (1, 2, 4, 8)
    bcaches = []
    with torch.inference_mode():
        for bi in range(max(batches)):
            c = model.new_cache()
            model.forward(ids[bi:bi + 32], c, last_only=True)
            bcaches.append(c)
    print(f"# benchmarks/qkernel_rows.py --baseline {a.baseline} --rounds {a.rounds}; load average "
          f"{os.getloadavg()[0]:.1f} at start (2-core box shared with other sessions)")
    with torch.inference_mode():
        for _ in range(a.rounds):
            for k in libs:
                use(k)
                r = res[k]
                cache = model.new_cache()
                t = clock()
                model.forward(ids, cache, last_only=True)
                r.setdefault("prefill", []).append(clock() - t)
                base = cache.length
                t = clock()
                for i in range(32):
                    model.forward(torch.tensor([100 + i]), cache)
                r.setdefault("step", []).append((clock() - t) / 32)
                cache.crop(base)
                for n in (5, 9):
                    t = clock()
                    for _ in range(4):
                        model.verify_forward(torch.arange(n) + 200, cache)
                        cache.crop(base)
                    r.setdefault(f"verify{n}", []).append((clock() - t) / 4)
                for m in ms:
                    tot = 0.0
                    for name, group in kinds.items():
                        x = torch.randn(m, group[0].in_features)
                        t = clock()
                        for lin in group:
                            lin(x)
                        dt = clock() - t
                        r.setdefault(f"{name}@{m}", []).append(dt)
                        tot += dt
                    r.setdefault(f"all@{m}", []).append(tot)
                for nb in batches:
                    for c in bcaches:
                        c.crop(32)
                    step_ids = torch.arange(nb) + 300
                    t = clock()
                    for _ in range(8):
                        model.step_batch(step_ids, bcaches[:nb])
                    r.setdefault(f"batch{nb}", []).append((clock() - t) / 8)
    best = {k: {n: min(v) for n, v in r.items()} for k, r in res.items()}
    print(f"{'':<9} {'prefill tok/s':>13} {'decode tok/s':>12} {'verify-5 / step':>15} {'verify-9 / step':>15}")
    for k, b in best.items():
        print(f"{k:<9} {len(ids) / b['prefill']:>13.0f} {1 / b['step']:>12.1f} {b['verify5'] / b['step']:>15.2f} "
              f"{b['verify9'] / b['step']:>15.2f}")
    print("\n# all matrices of the model at M activation rows: ms (this / baseline), and M rows / (M x 1 row)")
    print(f"{'M':>3} " + " ".join(f"{n:>16}" for n in ["all", *kinds]) + f" {'rows vs M x 1':>14}")
    for m in ms:
        cells = [f"{best['this'][f'{n}@{m}'] * 1e3:6.2f}/{best['baseline'][f'{n}@{m}'] * 1e3:6.2f}"
                 for n in ["all", *kinds]]
        eff = best["this"][f"all@{m}"] / (m * best["this"]["all@1"])
        eff0 = best["baseline"][f"all@{m}"] / (m * best["baseline"]["all@1"])
        print(f"{m:>3} " + " ".join(f"{c:>16}" for c in cells) + f" {eff:>6.2f}/{eff0:<6.2f}")
    print("\n# step_batch: B sequences' decode tokens in one step (after 32-token prompts): aggregate tok/s "
          "(this / baseline) and vs B = 1")
    print(f"{'B':>3} {'tok/s':>16} {'vs 1':>14}")
    for nb in batches:
        t, t0 = best["this"][f"batch{nb}"], best["baseline"][f"batch{nb}"]
        v, v0 = nb / t, nb / t0
        print(f"{nb:>3} {v:>7.1f}/{v0:<8.1f} {v * best['this']['batch1']:>6.2f}/{v0 * best['baseline']['batch1']:<6.2f}")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
