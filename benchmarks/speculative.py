"""Speculative decoding (issue #20): off / prompt-lookup / draft / auto, dense and packed MoE.

Decode tok/s with ``speculative`` off / prompt-lookup / draft (with ``--draft-model``) / auto, greedy, on (a) a quoting workload
(edit or copy a given public-domain text: the answer repeats its prompt) and (b) open chat. Each
prompt runs in every mode, interleaved (off, prompt-lookup, auto, then again) so drift on a busy
box hits the modes alike; a mode's figure is its generated tokens over its decode seconds, summed
over the workload's prompts, best of --repeat rounds. The greedy answers of the three modes must
be identical (checked: "same" column). Prefix cache off, so every run prefills alike.

    flock /tmp/bench.lock env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/speculative.py \\
        | tee benchmarks/results/speculative.txt

Packed MoE rows (``--moe DIR``, default moe_stream.py's int4 pack of its random Qwen3-MoE, 24
layers x 64 experts, top-8, when it exists): decode tok/s off / prompt-lookup / draft (the
self-draft: the same model on one expert per token) / auto at expert-cache budgets of 5/15/50% of
the bank, on (a) a prompt that repeats itself and (b) random ids. Each run is cold in a fresh
process inside a memory cgroup (v1) of resident + budget + 1 GiB, page cache counted, the pack's
pages dropped first (as moe_stream.py); a fresh engine per run, so ``auto`` starts knowing nothing
(the hardest case for it). The checkpoint's weights are random, so its routers pick near-uniformly
and its text never quotes: it measures what a verify and a self-draft cost against their
acceptance, not a real model's acceptance. MB/tok: expert bytes read per decoded token.

llama.cpp anchor (dense rows): llama-cpp-python's ``LlamaPromptLookupDecoding`` (its defaults) on
the same GGUF and the same prompt ids; "not installed" when llama_cpp is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks.*` when run as a script

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
    mode = "draft" if mode == "draft-model" else mode
    gen = eng.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, speculative=mode)
    text = "".join(gen)
    return {"text": text, "tokens": gen.stats.completion_tokens - 1, "decode_s": gen.stats.decode_s,
            "prompt_ids": list(gen.prompt_ids), **{k: v for k, v in gen.stats.extra.items() if k.startswith("spec_")}}


MOE_DEFAULT = Path(__file__).parent / ".work" / "moe" / "packed-int4"
MOE_MODES = ("off", "prompt-lookup", "draft", "auto", "off")  # off twice: its own spread


def _word_tokenizer(vocab: int, d: Path) -> Any:
    """The random checkpoint has no tokenizer: words "w0".."wN" map to ids (prompts are id lists)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from local_engine.tokenizer import from_hf_dir

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    return from_hf_dir(d)


def moe_prompts(vocab: int) -> dict[str, list[int]]:
    import random

    rng = random.Random(0)
    motif = [rng.randrange(vocab) for _ in range(24)]
    return {"repeat": motif * 2, "open": [rng.randrange(vocab) for _ in range(48)]}


def moe_worker(a: argparse.Namespace) -> None:
    """One cold run in this (fresh) process, inside the memory cgroup the parent made: a JSON line."""
    import json
    import tempfile

    import torch

    from benchmarks.moe_stream import join_cgroup
    from local_engine.formats.pack import read_manifest
    from local_engine.models.moe import MoEModel

    join_cgroup(a.cgroup)
    torch.set_num_threads(a.threads)
    vocab = int(read_manifest(a.moe).config["vocab_size"])
    ids = moe_prompts(vocab)[a.moe_prompt]
    with tempfile.TemporaryDirectory() as td:
        tok = _word_tokenizer(vocab, Path(td))
        model = MoEModel.open(a.moe, memory_budget=a.moe_budget, prefetch=False)
        eng = Engine(model, tok, format="flash-moe-pack", prefix_cache_mb=0)
        try:
            gen = eng.generate(" ".join(f"w{i}" for i in ids), max_tokens=a.moe_tokens, speculative=a.moe_mode)
            text = "".join(gen)
            st, x = model.stats(), gen.stats.extra
        finally:
            eng.close()
    print(json.dumps({"text": text, "tokens": gen.stats.completion_tokens - 1, "decode_s": gen.stats.decode_s,
                      "mb": st["store_bytes_read"] / 2**20, "completion": gen.stats.completion_tokens,
                      "hit": st["hit_rate"], **{k: v for k, v in x.items() if k.startswith("spec_")}}))


def moe_labels(modes: str) -> list[tuple[str, str]]:
    """(row label, mode) for ``--moe-modes``: a mode named again is run again under "mode#2" (off
    twice: the spread of off against itself, next to auto's ratio)."""
    out: list[tuple[str, str]] = []
    for mode in (m for m in modes.split(",") if m):
        n = sum(1 for _, m in out if m == mode)
        out.append((f"{mode}#{n + 1}" if n else mode, mode))
    return out


def moe_rows(a: argparse.Namespace) -> None:
    """Each (budget, prompt, mode) cold in a fresh worker inside a memory cgroup (v1) limited to
    resident + budget + 1 GiB, page cache included (as benchmarks/moe_stream.py); the modes of a
    (budget, prompt) interleaved over ``--moe-rounds`` rounds, best round kept."""
    import json
    import os
    import subprocess

    from benchmarks.moe_stream import evict, make_cgroup
    from local_engine.formats.pack import read_manifest

    m = read_manifest(a.moe)
    print(f"\n# packed MoE {a.moe} ({m.arch}, quant {m.quant}, bank {m.expert_bank_bytes / 2**20:.0f} MiB), "
          f"{a.moe_tokens} tokens greedy, {a.threads} thread(s), each run cold (pages dropped) in a fresh process in a "
          f"memory cgroup of resident + budget + 1 GiB; best of {a.moe_rounds} interleaved rounds; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'budget':<7} {'prompt':<7} {'mode':<14} {'tok/s':>7} {'vs off':>7} {'accept':>7} {'tok/fwd':>8} "
          f"{'MB/tok':>7} {'hit':>5} {'k chosen (auto)':<22} {'same':>5}")
    for frac in [float(f) for f in a.fractions.split(",") if f]:
        budget = int(frac * m.expert_bank_bytes)
        limit = int(m.resident_bytes) + budget + 2**30
        for name in moe_prompts(int(m.config["vocab_size"])):
            best: dict[str, dict[str, Any]] = {}
            for _ in range(a.moe_rounds):
                for label, mode in moe_labels(a.moe_modes):
                    evict(a.moe)
                    cg = make_cgroup(f"spec{int(frac * 100)}{mode}", limit)
                    try:
                        p = subprocess.run([sys.executable, __file__, "--moe-worker", "--cgroup", str(cg), "--moe",
                                            str(a.moe), "--moe-budget", str(budget), "--moe-prompt", name,
                                            "--moe-mode", mode, "--moe-tokens", str(a.moe_tokens),
                                            "--threads", str(a.threads)], capture_output=True, text=True, timeout=600)
                        failcnt = int((cg / "memory.failcnt").read_text())
                    finally:
                        cg.rmdir()
                    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
                    if p.returncode or not lines:
                        print(f"# {frac:.0%} {name} {mode}: worker failed rc={p.returncode}: {p.stderr[-300:]}")
                        continue
                    r = json.loads(lines[-1])
                    r["tok_s"], r["failcnt"] = r["tokens"] / r["decode_s"], failcnt
                    if label not in best or r["tok_s"] > best[label]["tok_s"]:
                        best[label] = r
            off = best.get("off")
            for label, r in best.items():
                drafted = r["spec_drafted"]
                ks = ",".join(f"{k}:{n}" for k, n in r.get("spec_auto_k", {}).items()) if label == "auto" else ""
                print(f"{frac:<7.0%} {name:<7} {label:<14} {r['tok_s']:>7.2f} "
                      f"{r['tok_s'] / off['tok_s'] if off else 0:>6.2f}x "
                      f"{(r['spec_accepted'] / drafted if drafted else 0):>7.0%} {r['spec_tokens_per_forward']:>8.2f} "
                      f"{r['mb'] / max(r['completion'], 1):>7.1f} {r['hit']:>5.2f} {ks:<22} "
                      f"{'yes' if off and r['text'] == off['text'] else 'NO':>5}")
            sys.stdout.flush()


def open_llamacpp(a: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp off and with its prompt lookup (llama-cpp-python ``LlamaPromptLookupDecoding``, its
    defaults) on the built-in model's GGUF; {} (with a line saying why) when it cannot run."""
    if a.skip_llamacpp:
        return {}
    try:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        print("# llama.cpp anchor: llama-cpp-python not installed (benchmarks/requirements-llamacpp.txt): no anchor rows")
        return {}
    from benchmarks.llamacpp_anchors import _open_llama

    if a.model != "builtin:smollm2-135m":
        print(f"# llama.cpp anchor: only for builtin:smollm2-135m's GGUF, not {a.model}")
        return {}
    return {"llama.cpp off": _open_llama(a.threads, n_ctx=1024),
            "llama.cpp lookup": _open_llama(a.threads, n_ctx=1024, draft_model=LlamaPromptLookupDecoding())}


def run_llamacpp(llm: Any, ids: list[int], max_tokens: int) -> dict[str, Any]:
    from benchmarks.llamacpp_anchors import _llama_complete

    text, n, dt, _ = _llama_complete(llm, ids, max_tokens)
    return {"text": text, "tokens": n - 1, "decode_s": dt, "spec_drafted": 0, "spec_accepted": 0, "spec_verifies": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--moe", type=Path, default=MOE_DEFAULT, help="a packed MoE dir (absent: no MoE rows)")
    ap.add_argument("--fractions", default="0.05,0.15,0.5", help="expert-cache budgets, fractions of the bank")
    ap.add_argument("--moe-tokens", type=int, default=32)
    ap.add_argument("--moe-rounds", type=int, default=2)
    ap.add_argument("--moe-modes", default=",".join(MOE_MODES),
                    help="MoE rows: which modes (comma-separated; one named twice runs twice, e.g. off's spread)")
    ap.add_argument("--draft-model", default=None, help="dense rows: a smaller model with --model's tokenizer")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--moe-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cgroup", help=argparse.SUPPRESS)
    ap.add_argument("--moe-budget", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--moe-prompt", help=argparse.SUPPRESS)
    ap.add_argument("--moe-mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.moe_worker:
        moe_worker(a)
        return
    import os

    t_all = time.perf_counter()
    print(f"# load average {os.getloadavg()[0]:.1f} at start (2-core box shared with other sessions)")
    if not a.skip_dense:
        dense_rows(a)
    if a.moe.is_dir():
        moe_rows(a)
    else:
        print(f"# no packed MoE at {a.moe} (make it with benchmarks/moe_stream.py --quants int4): no MoE rows")
    print(f"# {time.perf_counter() - t_all:.0f} s, load average {os.getloadavg()[0]:.1f} at the end")


def dense_rows(a: argparse.Namespace) -> None:
    eng = Engine.open(a.model, threads=a.threads, prefix_cache_mb=0, draft_model=a.draft_model)
    modes: tuple[str, ...] = ("off", "prompt-lookup", "auto")
    if a.draft_model:
        modes = ("off", "prompt-lookup", "draft-model", "auto")
    print(f"# benchmarks/speculative.py --max-tokens {a.max_tokens} --repeat {a.repeat} --threads {a.threads}"
          f"  ({a.model}, greedy; draft model: {a.draft_model or 'none'})")
    print(f"{'workload':<9} {'mode':<16} {'tok/s':>7} {'vs off':>7} {'accept':>7} {'tok/fwd':>8} "
          f"{'drafted':>8} {'same':>5}")
    llms = open_llamacpp(a)
    for name, prompts in workloads().items():
        best: dict[str, float] = {}
        last: dict[str, list[dict[str, Any]]] = {}
        for _ in range(a.repeat):
            rows: dict[str, list[dict[str, Any]]] = {m: [] for m in (*modes, *llms)}
            for p in prompts:
                for m in modes:
                    rows[m].append(run(eng, p, m, a.max_tokens))
                for m, llm in llms.items():  # the same prompt ids, interleaved with ours
                    rows[m].append(run_llamacpp(llm, rows["off"][-1]["prompt_ids"], a.max_tokens))
            for m in rows:
                tok_s = sum(r["tokens"] for r in rows[m]) / sum(r["decode_s"] for r in rows[m])
                best[m] = max(best.get(m, 0.0), tok_s)
            last = rows
        for m in (*modes, *llms):
            rs = last[m]
            drafted, accepted = sum(r["spec_drafted"] for r in rs), sum(r["spec_accepted"] for r in rs)
            verifies = sum(r["spec_verifies"] for r in rs)
            steps = sum(r["tokens"] for r in rs) - accepted - verifies  # forwards that were single steps
            fwd = (verifies + max(steps, 0))
            same = all(r["text"] == o["text"] for r, o in zip(rs, last["off"], strict=True))
            if m in llms:  # its own counters are not exposed: tok/s and whether its text is ours
                print(f"{name:<9} {m:<16} {best[m]:>7.1f} {best[m] / best['off']:>6.2f}x {'':>7} {'':>8} "
                      f"{'':>8} {'yes' if same else 'NO':>5}")
                continue
            print(f"{name:<9} {m:<16} {best[m]:>7.1f} {best[m] / best['off']:>6.2f}x "
                  f"{(accepted / drafted if drafted else 0):>7.0%} {(fwd + accepted) / fwd if fwd else 0:>8.2f} "
                  f"{drafted:>8} {'yes' if same else 'NO':>5}")
            sys.stdout.flush()
        if llms:
            print(f"# {name}: ours auto / llama.cpp prompt lookup {best['auto'] / best['llama.cpp lookup']:.2f}x, "
                  f"ours off / llama.cpp off {best['off'] / best['llama.cpp off']:.2f}x (target auto >= 0.8x)")
    costs = eng.spec_model.costs
    if costs.step_s:  # what auto measured on this model: an m-row verify in single steps
        print("# auto's measured forward cost, m rows: steps  " + "  ".join(
            f"{m}: {sec / costs.step_s:.2f}" for m, sec in sorted(costs.seconds.items())))



if __name__ == "__main__":
    main()
