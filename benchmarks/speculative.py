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
self-draft: the same model on one expert per token) / draft-model (``--moe-draft DIR``: a second
checkpoint with the same tokenizer: a packed MoE, streaming its own experts under the same budget,
or a dense HF dir; ``--moe-draft random-dense``: a small random Llama with the pack's vocabulary,
whose drafts are right ~1/vocab of the time: it measures what a draft model costs and whether
auto stops using one that does not pay) / auto (with the draft model when one is given) at
expert-cache budgets of 5/15/50% of the bank, each run cold (a fresh model, the pack's page cache dropped with POSIX_FADV_DONTNEED;
not inside moe_stream's memory cgroup), on (a) a prompt that repeats itself and (b) random ids.
The checkpoint's weights are random, so its text never quotes and its routers pick near-uniformly:
it measures what a verify and a self-draft cost against their acceptance, not a real model's
acceptance. MB/token: expert bytes read per decoded token.
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
    mode = "draft" if mode == "draft-model" else mode
    gen = eng.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, speculative=mode)
    text = "".join(gen)
    return {"text": text, "tokens": gen.stats.completion_tokens - 1, "decode_s": gen.stats.decode_s,
            **{k: v for k, v in gen.stats.extra.items() if k.startswith("spec_")}}


MOE_DEFAULT = Path(__file__).parent / ".work" / "moe" / "packed-int4"
MOE_MODES = ("off", "prompt-lookup", "draft", "draft-model", "auto")


def _word_tokenizer(vocab: int, d: Path) -> Any:
    """The random checkpoint has no tokenizer: words "w0".."wN" map to ids (prompts are id lists)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from local_engine.tokenizer import from_hf_dir

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    return from_hf_dir(d)


def _drop_pages(d: Path) -> None:
    import os

    for f in d.iterdir():  # cold: the pack's pages out of the page cache
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _random_dense_draft(d: Path, vocab: int) -> Path:
    """A small random Llama (4 layers, d = 256) with ``vocab`` tokens, saved as an HF dir."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def _open_draft(src: Path, budget: int, tokenizer_json: Path) -> Any:
    """(model, max_seq) of a draft: a packed MoE (cold, like the target) or a dense HF dir."""
    import shutil

    from local_engine.models.moe import MoEModel

    if (src / "manifest.json").is_file():
        _drop_pages(src)
        m = MoEModel.open(src, memory_budget=budget, prefetch=False)
        return m, m.max_seq
    if not (src / "tokenizer.json").is_file():
        shutil.copy(tokenizer_json, src / "tokenizer.json")
    d = Engine.open(src, threads=1, prefix_cache_mb=0)
    return d.model, d.max_seq


def moe_rows(packed: Path, fractions: list[float], tokens: int, draft_src: str | None) -> None:
    import os
    import random
    import tempfile

    from local_engine.engine import DraftModel
    from local_engine.formats.pack import read_manifest
    from local_engine.models.moe import MoEModel

    m = read_manifest(packed)
    vocab = int(m.config["vocab_size"])
    rng = random.Random(0)
    motif = [rng.randrange(vocab) for _ in range(24)]
    prompts = {"repeat": motif * 2, "open": [rng.randrange(vocab) for _ in range(48)]}
    print(f"\n# packed MoE {packed} ({m.arch}, quant {m.quant}, bank {m.expert_bank_bytes / 2**20:.0f} MiB), "
          f"{tokens} tokens greedy, cold per run, load {os.getloadavg()[0]:.1f}, draft model {draft_src or 'none'}")
    print(f"{'budget':<7} {'prompt':<7} {'mode':<14} {'tok/s':>7} {'vs off':>7} {'accept':>7} {'tok/fwd':>8} "
          f"{'MB/tok':>7} {'hit':>5} {'same':>5}")
    with tempfile.TemporaryDirectory() as td:
        tok = _word_tokenizer(vocab, Path(td))
        draft_pack = None
        if draft_src == "random-dense":
            draft_pack = _random_dense_draft(Path(td) / "draft", vocab)
        elif draft_src:
            draft_pack = Path(draft_src)
        for frac in fractions:
            budget = int(frac * m.expert_bank_bytes)
            for name, ids in prompts.items():
                ref: dict[str, Any] = {}
                for mode in MOE_MODES:
                    with_draft = draft_pack is not None and mode in ("draft-model", "auto")
                    if mode == "draft-model" and not with_draft:
                        continue
                    _drop_pages(packed)
                    model = MoEModel.open(packed, memory_budget=budget, prefetch=False)
                    eng = Engine(model, tok, format="flash-moe-pack", prefix_cache_mb=0)
                    if with_draft and draft_pack is not None:
                        dm, dm_seq = _open_draft(draft_pack, budget, Path(td) / "tokenizer.json")
                        eng.draft_model = DraftModel(dm, str(draft_pack), dm_seq)
                    try:
                        gen = eng.generate(" ".join(f"w{i}" for i in ids), max_tokens=tokens,
                                           speculative="draft" if mode == "draft-model" else mode)
                        text = "".join(gen)
                        st, x = model.stats(), gen.stats.extra
                        if eng.draft_model is not None and isinstance(eng.draft_model.model, MoEModel):
                            # the draft's reads are this run's reads too
                            st["store_bytes_read"] += eng.draft_model.model.stats()["store_bytes_read"]
                    finally:
                        eng.close()
                    n = gen.stats.completion_tokens - 1
                    row = {"tok_s": n / gen.stats.decode_s, "text": text, "mb": st["store_bytes_read"] / 2**20}
                    ref.setdefault("off", row)
                    drafted = x["spec_drafted"]
                    print(f"{frac:<7.0%} {name:<7} {mode:<14} {row['tok_s']:>7.2f} "
                          f"{row['tok_s'] / ref['off']['tok_s']:>6.2f}x "
                          f"{(x['spec_accepted'] / drafted if drafted else 0):>7.0%} {x['spec_tokens_per_forward']:>8.2f} "
                          f"{row['mb'] / max(gen.stats.completion_tokens, 1):>7.1f} {st['hit_rate']:>5.2f} "
                          f"{'yes' if text == ref['off']['text'] else 'NO':>5}")
                    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--moe", type=Path, default=MOE_DEFAULT, help="a packed MoE dir (absent: no MoE rows)")
    ap.add_argument("--fractions", default="0.05,0.15,0.5", help="expert-cache budgets, fractions of the bank")
    ap.add_argument("--moe-tokens", type=int, default=32)
    ap.add_argument("--moe-draft", default=None,
                    help="a model dir with --moe's tokenizer that drafts for it (draft-model rows), or random-dense")
    ap.add_argument("--draft-model", default=None, help="dense rows: a smaller model with --model's tokenizer")
    ap.add_argument("--skip-dense", action="store_true")
    a = ap.parse_args()
    import os

    t_all = time.perf_counter()
    print(f"# load average {os.getloadavg()[0]:.1f} at start (2-core box shared with other sessions)")
    if not a.skip_dense:
        dense_rows(a)
    if a.moe.is_dir():
        moe_rows(a.moe, [float(f) for f in a.fractions.split(",") if f], a.moe_tokens, a.moe_draft)
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
    print(f"{'workload':<9} {'mode':<14} {'tok/s':>7} {'vs off':>7} {'accept':>7} {'tok/fwd':>8} "
          f"{'drafted':>8} {'same':>5}")
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
    costs = eng.spec_model.costs
    if costs.step_s:  # what auto measured on this model: an m-row verify in single steps
        print("# auto's measured forward cost, m rows: steps  " + "  ".join(
            f"{m}: {sec / costs.step_s:.2f}" for m, sec in sorted(costs.seconds.items())))


if __name__ == "__main__":
    main()
