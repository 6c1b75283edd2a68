"""How close to Belady can ANY online cache get on the benchmark's recorded expert trace?

Belady knows the whole future trace. An online cache, however clever, decides what it holds
before the next token exists: during sampled decoding, the next token is drawn from the model's
own distribution after the current token's last layer. This script computes, along the recorded
run, the exact expected-hits bound that follows from that, and prints it next to Belady and our
policies for each budget.

The bound. Between the last insert of decode step j-1 and the first lookup of step j nothing
enters the cache, and whatever of step j's experts are hits must have been cached at that moment
(a set S of at most C bundles, chosen knowing only the history). So for every online policy

    E[hits at step j | history] <= max over |S| <= C of  sum_{(L, e) in S} P((L, e) routed at step j | history)

the sum of the C largest marginals, taken over the bundles requested before step j (a bundle
enters the cache only when a request misses it: prefetched reads are admitted only when used).
The marginals are exact: step j's input token is sampled at
temperature 1 from the model's logits, so P = sum over all V tokens v of p(v) * [(L, e) in the
routing the model computes for v], and this script runs every one of the V candidates through the
reference model (transformers, fp32) from the recorded prefix. Prefill steps add no hits for
anyone (an empty cache, each bundle once per step). Summing the per-step bounds over the run gives
an upper bound on the expected hit rate of every online policy, Bayes-optimal ones included.

    .venv/bin/python benchmarks/moe_online_bound.py --tokens 16 --check-sampled 4 --sample-size 1024
        # exact: all 8192 candidates, ~35 s a step on 2 cores (~10 min)
    .venv/bin/python benchmarks/moe_online_bound.py --tokens 128 --candidates 1024
        # sampled: ~5 s a step; 1024 samples gave the exact bound to 0.1% on the 16-token run

With ``--candidates N < V`` the marginals are estimated from N tokens sampled from p instead of
all V. The top-C sum of a noisy estimate is biased upward (it is convex), so the result stays an
upper bound in expectation, only a looser one; the script prints both on the first steps when
asked (``--check-sampled``) so the looseness is measured, not assumed.

Needs the benchmark checkpoint (``moe_stream.py`` makes it) and its recorded traces
(``benchmarks/.work/moe/traces/run-<prompt>+<tokens>-<budget>.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cache_research import belady_hits, replay  # noqa: E402
from moe_stream import CFG, SRC, TRACES, best_fixed_set, scored_cache_hits  # noqa: E402

Trace = list[list[tuple[int, int]]]


def load_model(threads: int) -> Any:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32)
    model.eval()
    return model


class RoutingTap:
    """Forward hooks on every layer's router: the experts each token was sent to, per layer."""

    def __init__(self, model: Any) -> None:
        self.picked: list[Any] = []  # per layer: LongTensor [tokens, top_k], last forward only
        self._handles = []
        for layer in model.model.layers:
            self._handles.append(layer.mlp.gate.register_forward_hook(self._hook))

    def _hook(self, _mod: Any, _inp: Any, out: Any) -> None:
        self.picked.append(out[2].detach())  # (router_logits, router_scores, router_indices)

    def take(self) -> list[Any]:
        got, self.picked = self.picked, []
        return got


def replay_run(model: Any, tap: RoutingTap, prompt: list[int], n_tokens: int) -> tuple[list[int], Trace, Any, list[Any]]:
    """Re-run the benchmark's seeded sampling; return tokens, the routing trace, the final KV cache
    and the next-token distribution before each decode step (what its token is drawn from). The
    cache before step j is the final one cropped to the prompt + j tokens (see ``prefix_cache``)."""
    import torch

    g = torch.Generator().manual_seed(1)
    cache = None
    trace: Trace = []
    dists = []
    ids = torch.tensor([prompt])
    toks: list[int] = []
    with torch.no_grad():
        for _ in range(n_tokens + 1):
            out = model(input_ids=ids, cache=cache, use_cache=True)
            cache = out.past_key_values
            for layer, idx in enumerate(tap.take()):
                trace.append([(layer, int(e)) for e in sorted(set(idx.flatten().tolist()))])
            lg = out.logits[0, -1]
            if len(toks) == n_tokens:
                break
            dists.append(torch.softmax(lg, -1))
            tok = int(torch.multinomial(dists[-1], 1, generator=g))
            toks.append(tok)
            ids = torch.tensor([[tok]])
    return toks, trace, cache, dists


def prefix_cache(final: Any, length: int) -> Any:
    """A copy of ``final`` holding only its first ``length`` positions: a causal model's keys and
    values for a position never depend on later ones, so this is the cache that prefix built."""
    c = copy.deepcopy(final)
    extra = c.get_seq_length() - length
    if extra > 0:
        c.crop(-extra)
    return c


def marginals(model: Any, tap: RoutingTap, cache: Any, p: Any, candidates: int, batch: int,
              rng: Any) -> Any:
    """P[(layer, expert) routed] for the next token x ~ p, exactly over all tokens or from samples."""
    import torch

    L, E, V = CFG["num_hidden_layers"], CFG["num_experts"], CFG["vocab_size"]
    if candidates >= V:
        toks, w = torch.arange(V), p
    else:
        toks = torch.multinomial(p, candidates, replacement=True, generator=rng)
        w = torch.full((candidates,), 1.0 / candidates)
    P = torch.zeros(L, E, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(toks), batch):
            chunk = toks[i:i + batch]
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(len(chunk))
            model.model(input_ids=chunk[:, None], cache=c, use_cache=True)
            for layer, idx in enumerate(tap.take()):
                hot = torch.zeros(len(chunk), E, dtype=torch.float64)
                hot.scatter_(1, idx.view(len(chunk), -1), 1.0)
                P[layer] += (w[i:i + batch, None].double() * hot).sum(0)
    return P


def topc_sum(P: Any, capacity: int, seen: Any | None = None) -> float:
    """The C largest marginals; only bundles already requested can be cached (a bundle enters the
    cache only after a request missed it), so the others count 0 when ``seen`` is given."""
    flat = (P if seen is None else P * seen).flatten()
    c = min(capacity, flat.numel())
    return float(flat.topk(c).values.sum()) if c > 0 else 0.0


def online_bound(trace: Trace, per_step: list[Any], capacity: int, prefill_steps: int) -> float:
    """Upper bound on any online policy's expected hit rate over ``trace`` (see the docstring):
    decode step j contributes the top-C sum of its marginals over the bundles requested before it."""
    import torch

    seen = torch.zeros_like(per_step[0], dtype=torch.float64)
    layers = per_step[0].shape[0]
    for st in trace[:prefill_steps]:
        for layer, e in st:
            seen[layer, e] = 1.0
    hits = 0.0
    for j, P in enumerate(per_step):
        hits += topc_sum(P, capacity, seen)
        for st in trace[prefill_steps + j * layers: prefill_steps + (j + 1) * layers]:
            for layer, e in st:
                seen[layer, e] = 1.0
    return hits / sum(len(s) for s in trace)


def marginal_oracle(trace: Trace, per_step: list[Any], capacity: int, layers: int) -> float:
    """Replay with a cache that KNOWS the exact marginals: during forward f it ranks bundles by their
    chance of being routed at forward f + 1 (from the logits forward f is still computing, so it
    even peeks slightly ahead), same pinning / victim / admission rule as ours. What perfect
    knowledge of the next token's distribution buys a real (demand-filled) cache."""
    steps = [(st[0][0], [e for _, e in st]) for st in trace]
    scores = (per_step[min(i // layers, len(per_step) - 1)].numpy() for i in range(len(steps)))
    return scored_cache_hits(steps, scores, capacity)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--budgets", default="0.05,0.15,0.50", help="fractions of the expert bank")
    ap.add_argument("--candidates", type=int, default=CFG["vocab_size"],
                    help="next-token candidates per step (all V = exact; fewer = sampled, a looser bound)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-sampled", type=int, default=0, metavar="N",
                    help="also estimate the first N steps from --sample-size samples, to measure the looseness")
    ap.add_argument("--sample-size", type=int, default=512)
    ap.add_argument("--save", type=Path, default=None, help="write the per-step marginals here (json)")
    ap.add_argument("--load", type=Path, default=None,
                    help="reuse marginals written by --save (same tokens) instead of computing them")
    a = ap.parse_args()

    import torch

    L, E = CFG["num_hidden_layers"], CFG["num_experts"]
    bank = L * E
    model = load_model(a.threads)
    tap = RoutingTap(model)
    prompt = random.Random(0).sample(range(CFG["vocab_size"]), a.prompt)
    t0 = time.perf_counter()
    toks, trace, final_cache, dists = replay_run(model, tap, prompt, a.tokens)
    saved = json.loads(a.load.read_text()) if a.load else None
    n_cand = saved["candidates"] if saved else a.candidates
    print(f"# online bound: {a.tokens} decode steps after a {a.prompt}-token prompt, "
          f"{'all ' + str(CFG['vocab_size']) if n_cand >= CFG['vocab_size'] else str(n_cand) + ' sampled'} "
          f"next-token candidates per step (replayed in {time.perf_counter() - t0:.0f} s)", flush=True)

    fracs = [float(x) for x in a.budgets.split(",")]
    recorded = {}
    for f in fracs:
        path = TRACES / f"run-{a.prompt}+{a.tokens}-{f:.2f}.json"
        if path.exists():
            rec = json.loads(path.read_text())
            recorded[f] = rec
            same = [set(es) for _, es in rec["trace"]] == [{e for _, e in st} for st in trace]
            print(f"# {path.name}: routing {'identical to' if same else 'DIFFERS from'} the reference replay",
                  flush=True)
            if not same:
                sys.exit(f"{path}: the recorded run's routing is not this model's: re-run moe_stream.py first")

    rng = torch.Generator().manual_seed(7)
    per_step = []
    loose = []
    if saved:
        if saved["tokens"] != toks:
            sys.exit(f"{a.load}: saved for other tokens than this run's")
        per_step = [torch.tensor(P, dtype=torch.float64) for P in saved["marginals"]]
        dists = []
        print(f"# marginals from {a.load}")
    for j, p in enumerate(dists):
        t = time.perf_counter()
        cache = prefix_cache(final_cache, a.prompt + j)
        P = marginals(model, tap, cache, p, a.candidates, a.batch, rng)
        per_step.append(P)
        if j < a.check_sampled and a.candidates >= CFG["vocab_size"]:
            Ps = marginals(model, tap, cache, p, a.sample_size, a.batch, rng)
            loose.append([(topc_sum(Ps, int(bank * f)), topc_sum(P, int(bank * f))) for f in fracs])
        print(f"  step {j + 1}/{len(dists)}: {time.perf_counter() - t:.0f} s; expected experts/step "
              f"{float(P.sum()):.1f} (= {L} x top-k)", file=sys.stderr, flush=True)

    print("\n| budget | bundles | Belady | online bound | bound / Belady | exact-marginals cache | / Belady "
          "| best fixed set | adaptive | router | adaptive / bound | router / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in fracs:
        cap = int(bank * f)
        bel = belady_hits(trace, cap).hit_rate
        bound = online_bound(trace, per_step, cap, prefill_steps=L)
        uses = probs = None
        if f in recorded:
            uses = [(n, list(u)) for n, u in recorded[f]["trace_uses"]]
            probs = recorded[f]["trace_probs"]
        steps = [[(layer, e) for layer, e in st] for st in trace]
        ad = replay(steps, cap, "adaptive", uses=uses).hit_rate
        ro = replay(steps, cap, "router", uses=uses, probs=probs).hit_rate if probs else float("nan")
        fixed = best_fixed_set(steps, cap)
        orc = marginal_oracle(steps, per_step, cap, L)
        print(f"| {f:.0%} | {cap} | {bel:.3f} | {bound:.3f} | **{bound / bel:.2f}** | {orc:.3f} | {orc / bel:.2f} "
              f"| {fixed:.3f} | {ad:.3f} | "
              f"{ro:.3f} | {ad / bound:.2f} | {ro / bound:.2f} |")
    if loose:
        print("\nSampled vs exact bound on the first steps (hits per step, mean): " + ", ".join(
            f"{f:.0%}: {sum(x[i][0] for x in loose) / len(loose):.2f} vs {sum(x[i][1] for x in loose) / len(loose):.2f}"
            for i, f in enumerate(fracs)))
    if a.save:
        a.save.write_text(json.dumps({"tokens": toks, "prompt": prompt, "candidates": a.candidates,
                                      "marginals": [P.tolist() for P in per_step]}))


if __name__ == "__main__":
    main()
