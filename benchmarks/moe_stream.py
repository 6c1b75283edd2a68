"""Stream a >4 GB MoE from disk under a memory budget: our engine vs the storage ceiling, Belady,
and transformers + accelerate disk offload (the peer a Python user would pick).

    .venv/bin/pip install -r benchmarks/requirements-moe.txt      # accelerate (peer only)
    .venv/bin/python benchmarks/moe_stream.py | tee benchmarks/results/moe_stream.txt

What it does, in one run:
1. generates (once, cached in benchmarks/.work/moe/) a random Qwen3-MoE checkpoint with
   realistic proportions (24 layers x 64 experts, top-8, fp32, ~4.5 GB of experts) and packs it;
2. measures this disk's ceiling on that file *for the decode's own read pattern*: inside the
   decoding process, between tokens, the previous token's reads are replayed by a bare reader
   (same bundles, same batches started together, same number of O_DIRECT reader threads), with
   the decode's mean compute time per batch as idle gaps between batches (this virtual disk is
   faster in bursts after idle time, and on bundles read recently: a ceiling taken with neither
   came out *below* what the decode achieved). Ceiling and decode thus share the disk's state
   (throttling, host cache, other tenants) within a second. A saturating 8-lane random read
   (2 s, before each run) is printed too, for reference only;
3. decodes cold (page cache evicted with POSIX_FADV_DONTNEED) at cache budgets of 5/15/50% of
   the expert bank, each in a fresh process inside a memory cgroup (v1) whose limit counts page
   cache: resident + budget + 1 GiB; then again with next-layer prefetch on, to decide if it pays;
4. replays each run's recorded expert trace through LRU, LFU-DA, TinyLFU, layer-LFU, router (fed
   the recorded router probabilities), the best fixed set (offline: the budget's worth of most-used
   experts, known in advance), Belady (optimal offline), and Belady on the same tokens shuffled;
5. runs transformers + accelerate (device_map="auto", max_memory, offload_folder) on the same
   checkpoint at the 15% budget, inside the same cgroup limit, for a few tokens;
6. replays synthetic skewed router traces (logits = Zipf popularity + slowly drifting noise, top-k,
   router probabilities recorded): routers of random weights pick experts near-uniformly, the worst
   case for any cache.
Traces with router probabilities are saved under benchmarks/.work/moe/traces/ and can be replayed
offline (``--replay-trace FILE --replay-tokens 16,64``); ``--record --tokens N`` records a long one.

``--quants int4,int2`` decodes quantised packs of the same checkpoint (group 64, packed once into
benchmarks/.work/moe/packed-<quant>/) at the same byte budgets (fractions of the first pack's bank)
and cgroup limits, and adds a table of tok/s and MB read per token against the first (with
``--prefetch-fractions`` every pack is also decoded with prefetch on, and compared with the first
pack under the same setting). A short run
(the setup alone packs ~1 GB of int4 + int2 from the 4.7 GB checkpoint):

    .venv/bin/python benchmarks/moe_stream.py --quants int4,int2 --tokens 8 --fractions 0.05,0.15 \
        --prefetch-fractions '' --skip-peer --skip-skewed

Memory columns: each worker's own peak RSS (VmHWM, see ``expert_store.peak_rss_bytes``) and its
cgroup's own peak usage (``memory.max_usage_in_bytes``, page cache included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import mmap
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "moe"
SRC, PACKED, OFFLOAD = WORK / "src", WORK / "packed", WORK / "offload"
TRACES = WORK / "traces"  # each run's expert trace with router probabilities, for replays
GiB = 2**30

CFG = dict(vocab_size=8192, hidden_size=768, num_hidden_layers=24, num_attention_heads=12,
           num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
           moe_intermediate_size=320, intermediate_size=1536, norm_topk_prob=True,
           max_position_embeddings=4096, tie_word_embeddings=False)


# ----------------------------------------------------------------------------- checkpoint

def make_checkpoint() -> None:
    """Random Qwen3-MoE in HF layout, written shard by shard (never the whole model in RAM)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    if (SRC / "model.safetensors.index.json").exists():
        return
    SRC.mkdir(parents=True, exist_ok=True)
    transformers.Qwen3MoeConfig(**CFG).save_pretrained(SRC)
    g = torch.Generator().manual_seed(0)
    H, Ie, E, V = CFG["hidden_size"], CFG["moe_intermediate_size"], CFG["num_experts"], CFG["vocab_size"]
    nh, nkv, hd = CFG["num_attention_heads"], CFG["num_key_value_heads"], CFG["head_dim"]

    def w(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    weight_map: dict[str, str] = {}
    shard_layers = 2
    n_shards = CFG["num_hidden_layers"] // shard_layers + 1
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        t: dict[str, torch.Tensor] = {}
        if s == n_shards - 1:
            t["model.embed_tokens.weight"] = torch.randn(V, H, generator=g)
            t["lm_head.weight"] = w(V, H)
            t["model.norm.weight"] = torch.ones(H)
        else:
            for layer in range(s * shard_layers, (s + 1) * shard_layers):
                p = f"model.layers.{layer}."
                t[p + "input_layernorm.weight"] = torch.ones(H)
                t[p + "post_attention_layernorm.weight"] = torch.ones(H)
                t[p + "self_attn.q_proj.weight"] = w(nh * hd, H)
                t[p + "self_attn.k_proj.weight"] = w(nkv * hd, H)
                t[p + "self_attn.v_proj.weight"] = w(nkv * hd, H)
                t[p + "self_attn.o_proj.weight"] = w(H, nh * hd)
                t[p + "self_attn.q_norm.weight"] = torch.ones(hd)
                t[p + "self_attn.k_norm.weight"] = torch.ones(hd)
                t[p + "mlp.gate.weight"] = w(E, H)
                for e in range(E):
                    q = f"{p}mlp.experts.{e}."
                    t[q + "gate_proj.weight"] = w(Ie, H)
                    t[q + "up_proj.weight"] = w(Ie, H)
                    t[q + "down_proj.weight"] = w(H, Ie)
        save_file(t, str(SRC / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        print(f"  wrote {name}", file=sys.stderr, flush=True)
    total = sum((SRC / f).stat().st_size for f in set(weight_map.values()))
    (SRC / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))


def packed_dir(quant: str) -> Path:
    """The fp32 pack is `packed/` (as before); quantised ones (group 64) sit beside it. A label
    ``EXPERTS@DENSE`` (``int2@int8``) is that pack with its resident matrices as ``pack --dense
    DENSE`` stores them (``redense``: the same experts.bin, linked)."""
    experts, _, dense = quant.partition("@")
    base = PACKED if experts == "none" else WORK / f"packed-{experts}"
    return base.with_name(f"{base.name}-d{dense}") if dense else base


def ensure_packed(quants: tuple[str, ...] = ("none",)) -> None:
    from local_engine.formats.pack import MANIFEST
    from local_engine.formats.pack_writer import pack, redense

    make_checkpoint()
    for q in quants:
        experts, _, dense = q.partition("@")
        if not (packed_dir(experts) / MANIFEST).exists():
            pack(SRC, packed_dir(experts), quant=experts)
        if dense and not (packed_dir(q) / MANIFEST).exists():
            redense(packed_dir(experts), packed_dir(q), dense)


# ----------------------------------------------------------------------------- helpers

def evict(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def cgroup_base() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if "memory" in ctrl.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise RuntimeError("no memory cgroup (v1) found in /proc/self/cgroup")


def make_cgroup(tag: str, limit: int) -> Path:
    cg = cgroup_base() / f"moe-bench-{tag}-{os.getpid()}"
    cg.mkdir(exist_ok=True)
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    return cg


def run_in_cgroup(args: list[str], limit: int, tag: str, timeout: float) -> dict[str, Any]:
    """Run this script as a worker inside a fresh memory cgroup; the worker joins it first."""
    cg = make_cgroup(tag, limit)
    try:
        cmd = [sys.executable, __file__, *args, "--cgroup", str(cg)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f}s"}
        failcnt = int((cg / "memory.failcnt").read_text())
        max_usage = int((cg / "memory.max_usage_in_bytes").read_text())
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            return {"error": f"rc={p.returncode}: {p.stderr[-800:]}"}
        out = json.loads(lines[-1])
        out["cgroup_max_usage"] = max_usage
        out["cgroup_failcnt"] = failcnt
        return out
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def join_cgroup(cg: str | None) -> None:
    if cg:
        Path(cg, "cgroup.procs").write_text(str(os.getpid()))


def measure_ceiling(path: Path, block: int, threads: int, seconds: float) -> float:
    """Parallel O_DIRECT reads of ``block`` bytes at random block-aligned offsets: bytes/s."""
    size = path.stat().st_size
    n_blocks = size // block
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bufs = [mmap.mmap(-1, block) for _ in range(threads)]
    rng = random.Random(1)
    stop = time.perf_counter() + seconds

    def lane(i: int) -> int:
        got = 0
        r = random.Random(rng.random() + i)
        while time.perf_counter() < stop:
            got += os.preadv(fd, [bufs[i]], r.randrange(n_blocks) * block)
        return got

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(lane, range(threads)))
    dt = time.perf_counter() - t0
    os.close(fd)
    return total / dt


class PatternCeiling:
    """The disk's speed for the decode's own read pattern, read by a bare reader: the same bundle
    slots in the same batches (started together on ``threads`` reader threads, O_DIRECT,
    page-aligned buffers, like the store), ``gap`` seconds idle between batches (the decode's
    compute), busy time counted like the store's (wall time with reads in flight)."""

    def __init__(self, fd: int, stride: int, threads: int) -> None:
        import threading

        self.fd, self.stride = fd, stride
        self.pool = ThreadPoolExecutor(threads)
        self._local = threading.local()
        self.bytes = 0
        self.seconds = 0.0
        self.reads = 0

    def _read(self, off: int) -> tuple[int, float, float]:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = mmap.mmap(-1, self.stride)
        t0 = time.perf_counter()
        n = os.preadv(self.fd, [buf], off)
        return n, t0, time.perf_counter()

    def replay(self, batches: list[tuple[int, ...]], gap: float) -> None:
        for slots in batches:
            if not slots:
                continue
            time.sleep(gap)
            done = list(self.pool.map(self._read, [s * self.stride for s in slots]))
            self.bytes += sum(n for n, _, _ in done)
            # time with >= 1 read in flight, as the store counts it (thread wake-up excluded: on
            # this loaded 2-core box it is CPU scheduling, not the disk)
            end = 0.0
            for _, t0, t1 in sorted(done, key=lambda d: d[1]):
                self.seconds += max(t1 - max(t0, end), 0.0)
                end = max(end, t1)
            self.reads += len(slots)

    @property
    def bandwidth(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------- workers

def worker_ours(a: argparse.Namespace) -> None:
    join_cgroup(a.cgroup)
    import torch
    from cache_research import TraceRecorder

    from local_engine.models.moe import MoEModel

    torch.set_num_threads(a.threads)
    rec = TraceRecorder()
    model = MoEModel.open(packed_dir(a.quant), memory_budget=a.budget, policy=a.policy, readers=a.readers, direct=True,
                          verify=a.verify, prefetch="auto" if a.prefetch_auto else a.prefetch,
                          standins=packed_dir(a.standin_quant) if a.standin_quant else None,
                          standin_below=a.standin_below, recorder=rec)
    model.overlap_misses = a.overlap
    prompt = random.Random(0).sample(range(CFG["vocab_size"]), a.prompt)
    io = rec
    pattern = PatternCeiling(model.store.fd, model.m.stride, a.readers)
    # seeded sampling (T=1): greedy on a random model falls into short loops that reuse the
    # same experts, which would flatter the cache; sampling keeps routing near-uniform
    g = torch.Generator().manual_seed(1)
    pick = lambda lg: int(torch.multinomial(torch.softmax(lg, -1), 1, generator=g))  # noqa: E731
    t0 = time.perf_counter()
    toks = []
    marks: list[int] = []  # len(read_batches) when each token came out
    run = model.run

    def replay_token(j: int) -> None:
        """Replay decode step j's reads (between marks j and j+1) with its mean compute gap."""
        batches = io.read_batches[marks[j]:marks[j + 1]]
        compute = max(run.decode_s - run.decode_io_wait_s, 0.0) / max(run.decode_tokens, 1)
        pattern.replay(batches, compute / max(len(batches), 1))

    for tok in model.generate_ids(prompt, a.tokens, sample=pick):
        # between tokens, outside the timed forward: replay the step before last (its bundles were
        # read about as recently as the decode's own re-reads are), not the one just read
        marks.append(len(io.read_batches))
        if len(marks) >= 3:
            replay_token(len(marks) - 3)
        toks.append(tok)
    marks.append(len(io.read_batches))
    for j in range(max(len(marks) - 3, 0), len(marks) - 1):  # the last two steps
        replay_token(j)
    wall = time.perf_counter() - t0
    s = model.stats()
    s["trace"] = [[layer, list(es)] for layer, es in io.trace]
    s["trace_uses"] = [[n, list(u)] for n, u in io.trace_uses]
    s["trace_probs"] = [None if p is None else [round(x, 6) for x in p] for p in io.trace_probs]
    s["pattern_ceiling_Bps"] = pattern.bandwidth
    s["pattern_reads"] = pattern.reads
    s["tokens"] = toks
    s["wall_s"] = wall
    s["stride"] = model.m.stride
    model.close()
    print(json.dumps(s))


def worker_peer(a: argparse.Namespace) -> None:
    join_cgroup(a.cgroup)
    import torch
    import transformers

    from local_engine.expert_store import peak_rss_bytes

    torch.set_num_threads(a.threads)
    if OFFLOAD.exists():
        shutil.rmtree(OFFLOAD)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        SRC, device_map="auto", max_memory={"cpu": a.max_memory}, offload_folder=str(OFFLOAD),
        dtype=torch.float32)
    load_s = time.perf_counter() - t0
    prompt = random.Random(0).sample(range(CFG["vocab_size"]), a.prompt)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t1
        t2 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.tokens + 1, min_new_tokens=a.tokens + 1, do_sample=False)
        total = time.perf_counter() - t2
    decode_s = max(total - ttft, 1e-9)
    print(json.dumps({"load_s": load_s, "ttft_s": ttft, "decode_tok_s": a.tokens / decode_s,
                      "tokens": out[0, len(prompt):].tolist(),
                      "peak_rss_bytes": peak_rss_bytes()}))  # its own (VmHWM), not ru_maxrss: see peak_rss_bytes


# ----------------------------------------------------------------------------- traces and replays

Trace = list[tuple[int, tuple[int, ...]]]  # (layer, experts) per step, token-major
Probs = list[list[float] | None]  # the router's probabilities over all experts per step (or None)


def router_trace(n_tokens: int, layers: int, experts: int, k: int, s: float, rho: float, sigma: float = 1.0,
                 seed: int = 0, hidden: list[Any] | None = None) -> tuple[Trace, Probs]:
    """A skewed routing trace generated the way a router makes one, so the router's probabilities
    are consistent with the choices: per layer, logits = s * log(Zipf popularity) (ranks permuted
    per layer) + sigma * z, with z a per-expert AR(1) process of lag-1 correlation ``rho`` (hidden
    states drift slowly from token to token); the chosen experts are the top-k of the logits and
    the recorded probabilities their softmax. ``hidden``, if given, receives the generator's state
    (popularity logits, then each step's noise) for ``model_oracle``."""
    rng = random.Random(seed)
    base = []
    for _ in range(layers):
        ranks = rng.sample(range(experts), experts)
        base.append([-s * math.log(ranks[e] + 1) for e in range(experts)])
    z = [[rng.gauss(0.0, 1.0) for _ in range(experts)] for _ in range(layers)]
    keep, fresh = rho, math.sqrt(1.0 - rho * rho)
    if hidden is not None:
        hidden.append(base)
    trace: Trace = []
    probs: Probs = []
    for _ in range(n_tokens):
        for layer in range(layers):
            zl = z[layer] = [keep * x + fresh * rng.gauss(0.0, 1.0) for x in z[layer]]
            if hidden is not None:
                hidden.append(zl)
            lg = [b + sigma * x for b, x in zip(base[layer], zl, strict=True)]
            top = sorted(range(experts), key=lg.__getitem__, reverse=True)[:k]
            m = max(lg)
            ex = [math.exp(x - m) for x in lg]
            tot = sum(ex)
            trace.append((layer, tuple(sorted(top))))
            probs.append([x / tot for x in ex])
    return trace, probs


def model_oracle(trace: Trace, hidden: list[Any], capacity: int, k: int, rho: float, sigma: float = 1.0,
                 samples: int = 256) -> float:
    """An online policy that KNOWS the generator of ``router_trace`` (each expert's popularity, the
    noise's current value and its correlation): after each step it scores the layer's experts by
    their exact chance of being in the layer's next top-k (Monte Carlo over the next noise) and
    keeps the highest (same pinning, victim and admission rule as the cache). An online policy
    that sees only the trace and the router's probabilities should not beat it by more than noise
    at small budgets (at large ones its one-token horizon is myopic): an empirical ceiling."""
    import numpy as np

    base = np.asarray(hidden[0])
    layers, experts = base.shape
    rng = np.random.default_rng(7)
    fresh = math.sqrt(1.0 - rho * rho)

    def scores() -> Any:
        score = np.zeros((layers, experts))
        for (layer, _), z in zip(trace, hidden[1:], strict=True):
            lg = base[layer] + sigma * rho * np.asarray(z) + sigma * fresh * rng.standard_normal((samples, experts))
            kth = -np.partition(-lg, k - 1, axis=1)[:, k - 1:k]
            score[layer] = (lg >= kth).mean(0)
            yield score

    return scored_cache_hits(trace, scores(), capacity)


def scored_cache_hits(trace: Trace, scores: Any, capacity: int) -> float:
    """Hit rate of a cache that ranks bundles by given scores: ``scores`` yields, for each step of
    ``trace``, an array [layers, experts] (the chance of each bundle being needed next). Same
    pinning, victim and admission rule as ours: evict the lowest-scored unpinned bundle, and only
    for a bundle that scores higher. The oracles' shared replay."""
    import numpy as np

    cached = pinned = None
    n = hits = total = 0
    for (layer, es), score in zip(trace, scores, strict=True):
        score = np.asarray(score)
        if cached is None:
            cached = np.zeros(score.shape, dtype=bool)
        pinned = np.zeros_like(cached)
        pinned[layer, list(es)] = True
        for e in es:
            total += 1
            if cached[layer, e]:
                hits += 1
                continue
            if capacity <= 0:
                continue
            if n >= capacity:
                cand = np.where(cached & ~pinned, score, np.inf)
                v = np.unravel_index(int(np.argmin(cand)), cand.shape)
                if not np.isfinite(cand[v]) or not score[layer, e] > cand[v]:
                    continue
                cached[v] = False
                n -= 1
            cached[layer, e] = True
            n += 1
    return hits / max(total, 1)


def reuse_stats(trace: Trace) -> tuple[float, float]:
    """(P(an expert used at a token is used again at its layer's next token), the same if tokens were
    independent draws with each expert's overall frequency): the temporal locality any online
    policy can exploit beyond popularity. Decode-like steps only (one step per layer per token)."""
    from collections import Counter

    per_layer: dict[int, list[set[int]]] = {}
    for layer, es in trace:
        per_layer.setdefault(layer, []).append(set(es))
    again = used = 0
    indep_num = indep_den = 0.0
    for steps in per_layer.values():
        steps = steps[1:]  # the prompt's prefill step is a batch, not a token
        for a, b in itertools.pairwise(steps):
            again += len(a & b)
            used += len(a)
        c = Counter(e for st in steps for e in st)
        n = max(len(steps), 1)
        indep_num += sum((v / n) ** 2 for v in c.values())
        indep_den += sum(v / n for v in c.values())
    return again / max(used, 1), indep_num / max(indep_den, 1e-12)


def runner_up_stats(trace: Trace, probs: Probs, k: int) -> tuple[float, float]:
    """Lever (a)'s premise, measured: of the experts the router ranked just below the cut at a token
    (ranks k+1 .. 2k by probability, not chosen), the share chosen at that layer's next token, vs
    the share expected from those experts' overall frequency alone."""
    from collections import Counter

    per_layer: dict[int, list[tuple[set[int], list[float]]]] = {}
    for (layer, es), p in zip(trace, probs, strict=True):
        if p is not None:
            per_layer.setdefault(layer, []).append((set(es), p))
    got = base = 0.0
    n = 0
    for steps in per_layer.values():
        steps = steps[1:]  # skip the prompt's prefill batch
        freq = Counter(e for es, _ in steps for e in es)
        for (_, p), (nxt, _) in itertools.pairwise(steps):
            ranked = sorted(range(len(p)), key=p.__getitem__, reverse=True)[k:2 * k]
            got += sum(e in nxt for e in ranked)
            base += sum(freq[e] / len(steps) for e in ranked)
            n += len(ranked)
    return got / max(n, 1), base / max(n, 1)


def best_fixed_set(steps: list[list[tuple[int, int]]], capacity: int) -> float:
    """Offline: hold the ``capacity`` most-used keys of the whole trace from the start (their
    first use still a miss). The ceiling of any policy that predicts by popularity alone."""
    from collections import Counter

    counts = Counter(k for step in steps for k in step)
    top = sorted(counts.values(), reverse=True)[:capacity]
    return sum(c - 1 for c in top) / max(sum(counts.values()), 1)


def shuffled_belady(steps: list[list[tuple[int, int]]], capacity: int, layers: int, prefill: bool,
                    seeds: int = 3) -> float:
    """Belady on the same trace with its tokens in random order (each token's steps kept together,
    the prompt's prefill first): the same popularity, no temporal locality. If it matches Belady
    on the real order, Belady's margin over online policies is foresight of the draws, which no
    online policy can learn."""
    from cache_research import belady_hits

    head = steps[:layers] if prefill else []
    toks = [steps[i:i + layers] for i in range(len(head), len(steps), layers)]
    out = 0.0
    for seed in range(seeds):
        order = toks[:]
        random.Random(seed).shuffle(order)
        out += belady_hits(head + [s for t in order for s in t], capacity).hit_rate
    return out / seeds


REPLAY_POLICIES = ("lru", "lfu-da", "tinylfu", "layer-lfu", "adaptive", "router")


def replay_all(trace: Trace, capacity: int, uses: list[tuple[int, list[int]]] | None = None,
               probs: Probs | None = None, layers: int | None = None) -> dict[str, float]:
    from cache_research import belady_hits, replay

    steps = [[(layer, e) for e in es] for layer, es in trace]
    out = {p: replay(steps, capacity, p, uses=uses, probs=probs).hit_rate for p in REPLAY_POLICIES}
    out["fixed"] = best_fixed_set(steps, capacity)
    out["belady"] = belady_hits(steps, capacity).hit_rate
    if layers:
        out["belady_shuffled"] = shuffled_belady(steps, capacity, layers, prefill=uses is not None)
    return out


def load_trace(path: Path, tokens: int | None = None) -> tuple[Trace, list[tuple[int, list[int]]], Probs, int]:
    """A worker's saved trace (prefill step per layer, then one step per layer per token), cut to
    ``tokens`` decode tokens. Routing does not depend on the cache, so one long trace serves every
    budget and every shorter length."""
    r = json.loads(path.read_text())
    layers = len({layer for layer, _ in r["trace"]})
    n = layers * (1 + tokens) if tokens is not None else len(r["trace"])
    trace = [(layer, tuple(es)) for layer, es in r["trace"][:n]]
    uses = [(u, list(c)) for u, c in r["trace_uses"][:n]]
    return trace, uses, r["trace_probs"][:n], layers


def replay_table(trace: Trace, uses: list[tuple[int, list[int]]] | None, probs: Probs | None, layers: int,
                 capacities: list[tuple[str, int]], oracle: Callable[[int], float] | None = None) -> None:
    """Hit rates of every policy replayed on one trace, against Belady (offline optimum), the best
    fixed set and Belady on the same tokens shuffled (see ``shuffled_belady``)."""
    again, indep = reuse_stats(trace)
    print(f"reuse: P(used again at the next token) {again:.3f} vs {indep:.3f} if tokens were independent draws "
          f"of the same popularity")
    if probs and any(p is not None for p in probs):
        k = max(len(es) for _, es in trace[layers:]) if len(trace) > layers else 1
        got, base = runner_up_stats(trace, probs, k)
        print(f"router runner-ups (ranks {k + 1}-{2 * k} by probability, not chosen): chosen at the next token "
              f"{got:.3f} vs {base:.3f} from their overall frequency alone")
    orc = " | model oracle (online) | model oracle / Belady" if oracle else ""
    print("| budget | " + " | ".join(REPLAY_POLICIES) + " | best fixed set | Belady | Belady, tokens shuffled "
          f"| adaptive / Belady | router / Belady | fixed set / Belady{orc} |")
    print("|" + "---|" * (len(REPLAY_POLICIES) + 7 + (2 if oracle else 0)))
    for label, cap in capacities:
        rep = replay_all(trace, cap, uses, probs, layers)
        b = rep["belady"] or float("nan")
        o = oracle(cap) if oracle else 0.0
        print(f"| {label} | " + " | ".join(f"{rep[p]:.3f}" for p in REPLAY_POLICIES)
              + f" | {rep['fixed']:.3f} | {b:.3f} | {rep['belady_shuffled']:.3f} | {rep['adaptive'] / b:.2f} "
              f"| {rep['router'] / b:.2f} | {rep['fixed'] / b:.2f}"
              + (f" | {o:.3f} | {o / b:.2f}" if oracle else "") + " |", flush=True)


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "peer"])
    ap.add_argument("--quant", default="none", help="(worker) which pack to decode")
    ap.add_argument("--quants", default="none",
                    help="packs to decode, e.g. int4,int2: each at the same byte budgets (fractions of the FIRST "
                         "one's expert bank) and cgroup limits; prefetch rows, peer and replays use the first")
    ap.add_argument("--cgroup")
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--max-memory", type=int, default=0)
    ap.add_argument("--policy", default="adaptive")
    ap.add_argument("--prefetch", action="store_true", help="(worker) next-layer prefetch on")
    ap.add_argument("--prefetch-auto", action="store_true",
                    help="(worker) prefetch chosen per token by the engine's PrefetchSwitch (its default)")
    ap.add_argument("--prefetch-fractions", default="0.05,0.15,0.5",
                    help="budgets also decoded with prefetch on, for every pack of --quants ('' to skip)")
    ap.add_argument("--verify", default="first")
    ap.add_argument("--overlap", action="store_true",
                    help="missed experts multiplied in their reader threads (MoEModel.overlap_misses), every row")
    ap.add_argument("--standins", default="",
                    help="a pack of --quants (e.g. int2) as low-bit stand-ins for the first pack's missed experts: "
                         "adds rows of the first pack with stand-ins at each --standin-below threshold")
    ap.add_argument("--standin-below", default="0.1",
                    help="router-weight thresholds for the stand-in rows (comma-separated); (worker) one value")
    ap.add_argument("--standin-quant", default="", help="(worker) the stand-in pack")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--readers", type=int, default=8, help="parallel expert reads (reader threads)")
    ap.add_argument("--peer-tokens", type=int, default=3)
    ap.add_argument("--peer-timeout", type=float, default=420)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--fractions", default="0.05,0.15,0.5")
    ap.add_argument("--replay-only", action="store_true", help="only the synthetic skewed-trace replay table")
    ap.add_argument("--skip-skewed", action="store_true", help="leave out the synthetic skewed-trace tables")
    ap.add_argument("--record", action="store_true",
                    help="only record a --tokens expert trace (with router probabilities) to "
                         "benchmarks/.work/moe/traces/ (whole bank cached, no cgroup: routing does not depend on it)")
    ap.add_argument("--replay-trace", type=Path, help="only replay a saved trace (see --record) against Belady")
    ap.add_argument("--replay-tokens", default="16,64", help="decode lengths replayed from --replay-trace")
    a = ap.parse_args()
    if a.worker == "ours":
        a.standin_below = float(a.standin_below)
        return worker_ours(a)
    if a.worker == "peer":
        return worker_peer(a)

    sys.path.insert(0, str(ROOT))
    t_setup = time.perf_counter()
    quants = tuple(a.quants.split(","))
    ensure_packed(quants)
    from local_engine.formats.pack import read_manifest

    mans = {q: read_manifest(packed_dir(q)) for q in quants}
    m = mans[quants[0]]
    bank, stride, resident = m.expert_bank_bytes, m.stride, m.resident_bytes
    L, E, k = len(m.moe_layers), m.num_experts, int(m.config["num_experts_per_tok"])
    ckpt = sum(f.stat().st_size for f in SRC.glob("*.safetensors"))
    print(f"# moe_stream: synthetic Qwen3-MoE, {L} layers x {E} experts, top-{k}, fp32 checkpoint "
          f"{ckpt / 1e9:.2f} GB; packs: " + ", ".join(
              f"{q}: expert bank {x.expert_bank_bytes / 1e9:.3f} GB ({x.stride / 2**20:.3f} MiB/bundle)"
              for q, x in mans.items()) + f"; resident {resident / 2**20:.0f} MiB; budgets are fractions of the "
          f"{quants[0]} bank (setup {time.perf_counter() - t_setup:.0f}s)")
    print(f"# machine: {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f} at start (shared box); "
          f"decode {a.tokens} tokens after an {a.prompt}-token prompt; torch threads {a.threads}"
          f"{'; misses multiplied in their reader threads (--overlap)' if a.overlap else ''}")
    if a.replay_only:
        return skewed_tables(L, E, k)
    caps = [(f"{f:.0%}", int(bank * f) // stride) for f in (0.05, 0.15, 0.5)]
    if a.replay_trace:
        for n in (int(x) for x in a.replay_tokens.split(",")):
            trace, uses, probs, layers = load_trace(a.replay_trace, n)
            print(f"\n## Replay of {a.replay_trace.name}, first {n} decode tokens (+ the prompt's prefill)")
            replay_table(trace, uses, probs, layers, caps)
        return None
    if a.record:
        TRACES.mkdir(parents=True, exist_ok=True)
        out = TRACES / f"decode-{a.prompt}+{a.tokens}.json"
        p = subprocess.run([sys.executable, __file__, "--worker", "ours", "--quant", quants[0], "--budget", str(bank),
                            "--policy", "lru",
                            "--tokens", str(a.tokens), "--prompt", str(a.prompt), "--threads", str(a.threads),
                            "--readers", str(a.readers)], capture_output=True, text=True, check=True)
        out.write_text(p.stdout.splitlines()[-1])
        print(f"recorded {out}")
        return None

    def ceiling_now(quant: str) -> float:
        return measure_ceiling(packed_dir(quant) / "experts.bin", mans[quant].stride, threads=8, seconds=2.0)

    def decode(frac: float, prefetch: bool, quant: str, standin_below: float | None = None) -> dict[str, Any]:
        qstride = mans[quant].stride
        budget = int(bank * frac) // qstride * qstride  # the same bytes for every pack
        limit = resident + budget + GiB
        alt = ["--standin-quant", a.standins, "--standin-below", str(standin_below)] if standin_below is not None else []
        evict(packed_dir(quant))
        sat, load0 = ceiling_now(quant), os.getloadavg()[0]
        evict(packed_dir(quant))
        if alt:
            evict(packed_dir(a.standins))
        r = run_in_cgroup(["--worker", "ours", "--quant", quant, "--budget", str(budget), "--policy", a.policy,
                           "--tokens", str(a.tokens), "--prompt", str(a.prompt), "--threads", str(a.threads),
                           "--readers", str(a.readers), "--verify", a.verify, *(["--prefetch"] if prefetch else []),
                           *(["--overlap"] if a.overlap else []),
                           *alt],
                          limit, f"ours{quant}{int(frac * 100)}{'p' if prefetch else ''}{'s' if alt else ''}",
                          timeout=900)
        r.update(frac=frac, budget=budget, limit=limit, saturating=sat, load=load0, prefetch=prefetch, quant=quant,
                 standin_below=standin_below)
        if "error" not in r:
            r["ceiling"] = r["pattern_ceiling_Bps"]
            TRACES.mkdir(parents=True, exist_ok=True)
            tag = ("" if quant == "none" else f"-{quant}") + (f"-s{standin_below}" if alt else "")
            saved = TRACES / f"run-{a.prompt}+{a.tokens}-{frac:.2f}{'p' if prefetch else ''}{tag}.json"
            saved.write_text(json.dumps({x: r[x] for x in ("trace", "trace_uses", "trace_probs", "tokens")}))
            trace, uses, probs, layers = load_trace(saved)
            r["replay_all"] = replay_all(trace, budget // qstride, uses, probs, layers)
        print(f"  ran budget {frac:.0%} prefetch={prefetch}: saturating {sat / 1e9:.2f} GB/s "
              f"{json.dumps({k: v for k, v in r.items() if k not in ('trace', 'trace_uses', 'trace_probs', 'tokens')})[:400]}",
              file=sys.stderr, flush=True)
        return r

    # The box is shared: CPU starvation lowers the disk's effective queue depth too. So each run
    # measures its own ceiling on its own read pattern, interleaved with its decode (see the
    # docstring), and its own compute time per token (decode time minus time blocked on reads).
    rows = [decode(float(x), False, q) for q in quants for x in a.fractions.split(",")]
    prows = [decode(float(x), True, q) for q in quants for x in a.prefetch_fractions.split(",") if x]
    if a.standins and a.standins not in quants:
        raise SystemExit(f"--standins {a.standins}: name one of --quants ({a.quants})")
    srows = [decode(float(x), False, quants[0], float(t)) for x in a.fractions.split(",")
             for t in a.standin_below.split(",")] if a.standins else []

    peer = None
    if not a.skip_peer:
        frac = 0.15
        budget = int(bank * frac) // stride * stride
        limit = resident + budget + GiB
        evict(SRC)
        peer = run_in_cgroup(["--worker", "peer", "--max-memory", str(resident + budget), "--tokens",
                              str(a.peer_tokens), "--prompt", str(a.prompt), "--threads", str(a.threads)],
                             limit, "peer", timeout=a.peer_timeout)
        peer.update(frac=frac, limit=limit)
        if OFFLOAD.exists():
            shutil.rmtree(OFFLOAD)

    def derived(r: dict[str, Any]) -> dict[str, float]:
        bpt = r["decode_bytes_read_per_token"]
        tps = r["decode_tok_s"]
        decode_s = r["decode_tokens"] / tps
        compute_pt = (decode_s - r["decode_io_wait_s"]) / r["decode_tokens"]
        bound = r["ceiling"] / bpt if bpt else float("inf")
        both = 1.0 / max(bpt / r["ceiling"] if bpt else 0.0, compute_pt)
        return {"bpt": bpt, "tps": tps, "decode_s": decode_s, "compute_pt": compute_pt, "bound": bound,
                "both": both, "bw": r["decode_read_bandwidth_Bps"]}

    # ------------------------------------------------------------------ table
    print()
    print("## Cold decode, random-router checkpoint (near-uniform expert use: worst case for caching)")
    print(f"policy {a.policy}, no prefetch, checksums verified on first read ({a.verify}); limit = memory cgroup v1 "
          f"(page cache counted) = resident + budget + 1 GiB")
    hdr = ("| budget (% bank) | cgroup limit | load avg | tok/s | MB read/token | miss-read GB/s | ceiling GB/s "
           "| / ceiling | I/O bound tok/s | tok/s / I/O bound | compute s/token | tok/s / max(I/O, compute) bound "
           "| hit rate decode | hit rate all "
           "| LRU | LFU-DA | TinyLFU | layer-LFU | adaptive | router | best fixed set | Belady "
           "| Belady, tokens shuffled | ours / Belady | adaptive / Belady | router / Belady | best fixed set / Belady "
           "| I/O wait | peak RSS (worker's own) | RSS - resident - budget | cgroup peak (max_usage_in_bytes) "
           "| 8-lane GB/s |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['frac']:.0%} | error: {r['error'][:200]} |")
            continue
        d = derived(r)
        rep = r["replay_all"]
        qlabel = f"{r['quant']} " if len(quants) > 1 else ""
        print(f"| {qlabel}{r['frac']:.0%} ({r['budget'] / 2**20:.0f} MiB) | {r['limit'] / 2**30:.2f} GiB "
              f"| {r['load']:.1f} "
              f"| {d['tps']:.2f} | {d['bpt'] / 1e6:.0f} | {d['bw'] / 1e9:.2f} | {r['ceiling'] / 1e9:.2f} "
              f"| {d['bw'] / r['ceiling']:.2f} | {d['bound']:.2f} "
              f"| {d['tps'] / d['bound']:.2f} | {d['compute_pt']:.2f} | {d['tps'] / d['both']:.2f} "
              f"| {r['decode_hit_rate']:.3f} | {r['hit_rate']:.3f} | {rep['lru']:.3f} | {rep['lfu-da']:.3f} "
              f"| {rep['tinylfu']:.3f} | {rep['layer-lfu']:.3f} | {rep['adaptive']:.3f} | {rep['router']:.3f} "
              f"| {rep['fixed']:.3f} | {rep['belady']:.3f} | {rep['belady_shuffled']:.3f} "
              f"| {r['hit_rate'] / rep['belady'] if rep['belady'] else float('nan'):.2f} "
              f"| {rep['adaptive'] / rep['belady'] if rep['belady'] else float('nan'):.2f} "
              f"| {rep['router'] / rep['belady'] if rep['belady'] else float('nan'):.2f} "
              f"| {rep['fixed'] / rep['belady'] if rep['belady'] else float('nan'):.2f} "
              f"| {r['decode_io_wait_s'] / d['decode_s']:.0%} | {r['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"| {(r['peak_rss_bytes'] - resident - r['budget']) / 2**20:.0f} MiB "
              f"| {r['cgroup_max_usage'] / 2**20:.0f} MiB | {r['saturating'] / 1e9:.2f} |")
    print("tok/s, MB/token, bandwidth, bounds, I/O wait: decode only (the prompt's batched prefill is "
          "excluded). miss-read GB/s = decode bytes read / wall time with >= 1 read in flight. "
          "ceiling: the same run's reads (same bundles, same batches started together, same "
          f"{a.readers} O_DIRECT reader threads, the decode's mean compute per batch as idle gaps) replayed by a bare "
          "reader between tokens, one token late: the disk's speed for this pattern under the same conditions. "
          "I/O bound = ceiling / bytes read per token; "
          "compute s/token = decode time not blocked on reads; max(I/O, compute) bound = 1 / max(bytes/ceiling, "
          "compute s/token), i.e. perfect overlap. Hit rates ('all' = prefill + decode of the recorded expert "
          "trace): ours online, then replays of the same trace: LRU, LFU-DA, TinyLFU, layer-LFU, adaptive, router "
          "(router-probability-aware; all online), best fixed set and Belady (offline, know the future), and Belady on the same "
          "tokens in random order (same popularity, no temporal locality: when it equals Belady, Belady's margin is "
          "foresight of near-independent draws, not locality an online policy could learn). 8-lane GB/s: saturating random reads (8 in flight "
          "all the time, 2 s) just before the run, for reference. peak RSS: the worker's own (VmHWM; until "
          "session 7 ru_maxrss, which a child inherits from the process that forked it: every row read 5165 MiB, "
          "the checkpoint generator's); cgroup peak: the cgroup's memory.max_usage_in_bytes, page cache included.")

    if len(quants) > 1:
        print()
        print(f"## Packs at the same byte budgets (fractions of the {quants[0]} bank) and cgroup limits")
        print(f"| budget | pack (experts@dense) | bundle MiB | tok/s | MB read/token: experts | dense (resident "
              f"matrices) | both | hit rate decode | compute s/token | I/O wait | tok/s ÷ {quants[0]} "
              f"| expert MB/token ÷ {quants[0]} | I/O bound tok/s | I/O bound ÷ {quants[0]}'s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        # each row against the first pack's row at the same budget and prefetch setting
        base_rows = {(r["frac"], r["prefetch"]): r for r in rows + prows if r["quant"] == quants[0] and "error" not in r}
        for r in rows + prows:
            if "error" in r:
                continue
            d, b = derived(r), base_rows.get((r["frac"], r["prefetch"]))
            db = derived(b) if b else None
            dense_mb = r["dense_bytes_per_token"] / 1e6
            print(f"| {r['frac']:.0%} ({r['budget'] / 2**20:.0f} MiB) | {r['quant']}"
                  f"{' + prefetch' if r['prefetch'] else ''} | "
                  f"{mans[r['quant']].stride / 2**20:.3f} | {d['tps']:.2f} | {d['bpt'] / 1e6:.1f} | "
                  f"{dense_mb:.1f} | {d['bpt'] / 1e6 + dense_mb:.1f} | "
                  f"{r['decode_hit_rate']:.3f} | {d['compute_pt']:.3f} | {r['decode_io_wait_s'] / d['decode_s']:.0%} | "
                  f"{d['tps'] / db['tps'] if db else float('nan'):.2f}x | "
                  f"{d['bpt'] / db['bpt'] if db and db['bpt'] else float('nan'):.2f} | {d['bound']:.1f} | "
                  f"{d['bound'] / db['bound'] if db else float('nan'):.2f}x |")
        print("I/O bound: the row's own read pattern replayed by a bare reader (its ceiling) over its bytes per "
              "token, no compute: a pack's tok/s ratio can reach its I/O-bound ratio only when compute is "
              "hidden behind the reads or negligible.")

    if srows:
        print()
        print(f"## Low-bit stand-ins on a miss: the {quants[0]} pack, a missed expert with router weight below the "
              f"threshold computed from its {a.standins} bundle (HOBBIT), same budgets and cgroup limits")
        print(f"| budget | stand-ins below | tok/s | tok/s ÷ {quants[0]} alone | tok/s ÷ {a.standins} alone "
              "| MB read/token | stand-in uses / decode token | hit rate decode | compute s/token | I/O wait |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        alone = {(r["quant"], r["frac"]): r for r in rows if "error" not in r}
        for r in srows:
            if "error" in r:
                print(f"| {r['frac']:.0%} | {r['standin_below']} | error: {r['error'][:200]} |")
                continue
            d = derived(r)
            ratios = []
            for q in (quants[0], a.standins):
                b = alone.get((q, r["frac"]))
                ratios.append(f"{d['tps'] / derived(b)['tps']:.2f}x" if b else "-")
            print(f"| {r['frac']:.0%} ({r['budget'] / 2**20:.0f} MiB) | {r['standin_below']} | {d['tps']:.2f} "
                  f"| {ratios[0]} | {ratios[1]} | {d['bpt'] / 1e6:.1f} "
                  f"| {r['standin_uses'] / max(r['decode_tokens'], 1):.1f} | {r['decode_hit_rate']:.3f} "
                  f"| {d['compute_pt']:.3f} | {r['decode_io_wait_s'] / d['decode_s']:.0%} |")
        print("stand-ins serve decode steps only (the prompt's batched prefill reads every expert's own bundle); "
              "MB read/token counts both packs' reads. Quality of the same setting: benchmarks/quality.py's "
              "stand-in rows (KL against the lossless pack).")

    if prows:
        print()
        print("## Next-layer prefetch (layer L+1's router on layer L's output, reads started before L+1's "
              "attention), same runs with prefetch on")
        print("| budget | pack | prefetch | tok/s | vs off | MB read/token | guesses used | I/O wait | ceiling GB/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        off = {(r["quant"], r["frac"]): r for r in rows if "error" not in r}
        for r in prows:
            if "error" in r:
                print(f"| {r['frac']:.0%} | {r['quant']} | on | error: {r['error'][:200]} |")
                continue
            base = off.get((r["quant"], r["frac"]))
            for label, x in (("off", base), ("on", r)):
                if x is None:
                    continue
                d = derived(x)
                used = (f"{x['store_prefetch_used']}/{x['store_prefetch_reads']}"
                        if x["store_prefetch_reads"] else "-")
                print(f"| {x['frac']:.0%} | {x['quant']} | {label} | {d['tps']:.2f} | {d['tps'] / derived(base)['tps'] if base else float('nan'):.2f}x "
                      f"| {d['bpt'] / 1e6:.0f} | {used} | {x['decode_io_wait_s'] / d['decode_s']:.0%} "
                      f"| {x['ceiling'] / 1e9:.2f} |")
        print("guesses used: speculative reads a request then consumed / speculative reads done (the rest is "
              "wasted disk time and bytes, counted in MB read/token).")

    if peer is not None:
        ours15 = next((r for r in rows if abs(r["frac"] - 0.15) < 1e-9 and r["quant"] == quants[0]
                       and "error" not in r), None)
        print()
        print("## Peer: transformers + accelerate disk offload, same checkpoint, same cgroup limit")
        if "error" in peer:
            print(f"peer failed: {peer['error']}")
        else:
            sp = ours15["decode_tok_s"] / peer["decode_tok_s"] if ours15 else float("nan")
            print("| engine | budget | cgroup limit | load s | decode tok/s | peak RSS (own) | cgroup peak "
                  "| speed-up |")
            print("|---|---|---|---|---|---|---|---|")
            if ours15:
                print(f"| ours ({quants[0]} pack, O_DIRECT, {a.policy}) | 15% | {peer['limit'] / 2**30:.2f} GiB | - "
                      f"| {ours15['decode_tok_s']:.2f} | {ours15['peak_rss_bytes'] / 2**20:.0f} MiB "
                      f"| {ours15['cgroup_max_usage'] / 2**20:.0f} MiB | {sp:.1f}x |")
            print(f"| transformers {__import__('transformers').__version__} + accelerate, "
                  f"max_memory=resident+budget | 15% | {peer['limit'] / 2**30:.2f} GiB | {peer['load_s']:.0f} "
                  f"| {peer['decode_tok_s']:.3f} ({a.peer_tokens} tokens) | {peer['peak_rss_bytes'] / 2**20:.0f} MiB "
                  f"| {peer['cgroup_max_usage'] / 2**20:.0f} MiB | 1.0x |")

    if not a.skip_skewed:
        skewed_tables(L, E, k)


def skewed_tables(L: int, E: int, k: int) -> None:
    for zipf_s, rho, label in ((1.1, 0.5, "popular experts, mild drift"), (0.8, 0.85, "sticky routing")):
        print()
        print(f"## Cache policy on a synthetic SKEWED router trace ({label}), 400 tokens, replay only, no I/O")
        print(f"Generated as a router makes one: per layer, logits = {zipf_s} x log(Zipf popularity) + AR(1) noise "
              f"(sd 1, lag-1 correlation {rho}: hidden states drift slowly); the chosen experts are the top-{k} of "
              "the logits and the recorded router probabilities their softmax (what `router` sees). Model oracle: "
              "an online policy that knows the generator (popularity, current noise, its correlation) and keeps "
              "the experts most likely to be in their layer's next top-k: an empirical ceiling for online policies "
              "at small budgets (its one-token horizon is myopic at large ones).")
        hidden: list[Any] = []
        tr, probs = router_trace(400, L, E, k, s=zipf_s, rho=rho, seed=0, hidden=hidden)
        replay_table(tr, None, probs, L, [(f"{f:.0%}", int(L * E * f)) for f in (0.05, 0.15, 0.24, 0.5)],
                     oracle=lambda cap, tr=tr, hidden=hidden, rho=rho: model_oracle(tr, hidden, cap, k, rho))


if __name__ == "__main__":
    main()
