"""The seed's scenario at desk scale (issue #24): a MoE 16x larger than its memory, decoded cold.

The phone ran 200 GB of weights in 12 GB of RAM. Here: a synthetic Qwen3-MoE pack of >= 24 GB
(default 26 GB of experts: 16x the limit; int4 experts, group 64, the layout
local_engine/formats/pack_writer.py writes) decoded inside a memory cgroup (v1, page cache counted) of
1.5 GiB, after the pack's pages were dropped from the page cache
(POSIX_FADV_DONTNEED). In the same run, the disk's I/O bound for this model: O_DIRECT reads of
whole expert bundles at random bundle offsets of the same file, on as many threads as the
engine's expert reader, measured just before and just after the decode (their mean is the
figure; both are printed). The bound in tok/s is that bandwidth / the bytes the decode read per
token; the target is decode tok/s >= 0.6 of it.

The model: Qwen3-30B-A3B's expert shapes (hidden 2048, expert width 768, top-8) over 48 layers,
as many experts per layer as the size asks for (26 GB: 217), attention narrowed to 4 heads x 64
(2 KV heads) so the lossless fp32 resident part (attention, routers, norms, a 512-token
vocabulary) stays ~0.4 GB of the 1.5 GiB. Weights are random: what is measured is the streaming,
not the text. The pack is written directly in packed form, no checkpoint round trip: a pool of
--pool distinct experts (random normal weights, fixed seed, quantised by pack.quantize) is
repeated over the bank (bundle i holds pool[i % pool]; routing does not depend on it: the random
routers pick experts near-uniformly); every bundle's checksum (crc32c, as pack() writes) is the
real one, so the engine's verify-on-first-read checks it. Pages are written with fdatasync + DONTNEED every 256 MiB, so the
writer never fills the page cache. The pack is deleted at the end (--keep keeps it).

Three decode rows: the engine's defaults (``verify="first"``: a crc32c of every bundle the first
time it is read, which here is nearly every read), ``first:crc32`` (the same on a version 1 twin
of the pack: the same data files, hard-linked, under a manifest of zlib crc32s, the checksum
before issue #24's fix) and ``verify="never"``, to show what each checksum costs on this CPU. Each decode is a fresh process in its own cgroup, cold, seeded
sampling at T=1 (as benchmarks/moe_stream.py: greedy on a random model loops over the same
experts and would flatter the cache), 1 torch thread, expert cache budget = limit - resident -
--overhead-mb (Python, torch, the reader's buffers).

    flock /tmp/bench.lock .venv/bin/python benchmarks/desk_scale.py --out benchmarks/results/desk_scale.txt
    .venv/bin/python benchmarks/desk_scale.py --size-gb 0.05 --layers 2 --tokens 4   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GiB, MiB = 2**30, 2**20
FLUSH = 256 * MiB  # fdatasync + drop the written pages every this many bytes


# --------------------------------------------------------------------------- the pack

def config(layers: int, experts: int, hidden: int, width: int, top_k: int) -> dict[str, Any]:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 512,
            "hidden_size": hidden, "intermediate_size": 2 * hidden, "moe_intermediate_size": width,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "bos_token_id": None, "eos_token_id": 0, "torch_dtype": "float32"}


def resident_tensors(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Every non-expert tensor of a Qwen3-MoE (the names transformers writes), random, fp32."""
    import torch

    g = torch.Generator().manual_seed(seed)
    H, V, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    nh, nkv, E = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_experts"]

    def w(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) * (2.0 / in_f**0.5)

    t = {"model.embed_tokens.weight": torch.randn(V, H, generator=g), "model.norm.weight": torch.ones(H),
         "lm_head.weight": w(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
              p + "self_attn.q_proj.weight": w(nh * hd, H), p + "self_attn.k_proj.weight": w(nkv * hd, H),
              p + "self_attn.v_proj.weight": w(nkv * hd, H), p + "self_attn.o_proj.weight": w(H, nh * hd),
              p + "self_attn.q_norm.weight": torch.ones(hd), p + "self_attn.k_norm.weight": torch.ones(hd),
              p + "mlp.gate.weight": w(E, H)}
    return t


def expert_pool(cfg: dict[str, Any], n: int, group: int, seed: int) -> tuple[list[dict[str, Any]], list[bytes]]:
    """n distinct int4 bundles: (parts, bundle bytes padded to the stride)."""
    import torch

    from local_engine.formats.pack import ALIGN, RESIDENT_ALIGN, dtype_name
    from local_engine.formats.pack_quant import quantize

    g = torch.Generator().manual_seed(seed + 1)
    H, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    parts: list[dict[str, Any]] = []
    bundles = []
    for _ in range(n):
        gate_up = torch.randn(2 * inter, H, generator=g) * (2.0 / H**0.5)
        down = torch.randn(H, inter, generator=g) * (2.0 / inter**0.5)
        q1, s1 = quantize(gate_up, "int4", group)
        q2, s2 = quantize(down, "int4", group)
        arrays = [("gate_up", q1), ("gate_up.scale", s1), ("down", q2), ("down.scale", s2)]
        if not parts:
            rel = 0
            for name, a in arrays:
                rel = -(-rel // RESIDENT_ALIGN) * RESIDENT_ALIGN
                nb = a.numel() * a.element_size()
                parts.append({"name": name, "shape": list(a.shape), "dtype": dtype_name(a.dtype), "offset": rel,
                              "nbytes": nb})
                rel += nb
            stride = -(-rel // ALIGN) * ALIGN
        buf = bytearray(stride)
        for p, (_, a) in zip(parts, arrays, strict=True):
            buf[p["offset"]:p["offset"] + p["nbytes"]] = a.contiguous().view(torch.uint8).numpy().tobytes()
        bundles.append(bytes(buf))
    return parts, bundles


def _drop(fd: int, upto: int) -> None:
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, upto, os.POSIX_FADV_DONTNEED)


def write_pack(dst: Path, cfg: dict[str, Any], group: int, pool: int, seed: int, progress: bool,
               v1_twin: Path | None = None) -> None:
    """resident.bin, experts.bin and manifest.json, as pack.pack() lays them out; `v1_twin`: also a
    version 1 pack there (hard links to the data files, zlib crc32s in its manifest)."""
    from local_engine.formats.pack import (
        ALIGN,
        CHECKSUM,
        CHECKSUMS,
        EXPERTS_FILE,
        FORMAT_NAME,
        FORMAT_VERSION,
        MANIFEST,
        RESIDENT_ALIGN,
        RESIDENT_FILE,
        V1_CHECKSUM,
        dtype_name,
        read_manifest,
    )

    dst.mkdir(parents=True, exist_ok=True)
    checksum, v1_checksum = CHECKSUMS[CHECKSUM], CHECKSUMS[V1_CHECKSUM]
    res_v1: dict[str, int] = {}
    res_meta: dict[str, Any] = {}
    with open(dst / RESIDENT_FILE, "wb") as f:
        off = 0
        for name, t in resident_tensors(cfg, seed).items():
            data = t.contiguous().numpy().tobytes()
            pad = -off % RESIDENT_ALIGN
            f.write(b"\0" * pad)
            off += pad
            f.write(data)
            res_meta[name] = {"offset": off, "nbytes": len(data), "shape": list(t.shape),
                              "dtype": dtype_name(t.dtype), CHECKSUM: checksum(data)}
            if v1_twin is not None:
                res_v1[name] = v1_checksum(data)
            off += len(data)
        res_size = off
        _drop(f.fileno(), 0)
    parts, bundles = expert_pool(cfg, pool, group, seed)
    stride = len(bundles[0])
    bundle_nbytes = parts[-1]["offset"] + parts[-1]["nbytes"]
    crcs_pool = [checksum(memoryview(b)[:bundle_nbytes]) for b in bundles]
    v1_pool = [v1_checksum(memoryview(b)[:bundle_nbytes]) for b in bundles] if v1_twin is not None else []
    layers, E = cfg["num_hidden_layers"], cfg["num_experts"]
    total = layers * E
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total * stride, unit="B", unit_scale=True, desc=f"write {dst.name}")
    crcs = []
    with open(dst / EXPERTS_FILE, "wb") as f:
        since = 0
        for i in range(total):
            f.write(bundles[i % pool])
            crcs.append(crcs_pool[i % pool])
            since += stride
            if since >= FLUSH:
                _drop(f.fileno(), (i + 1) * stride)
                since = 0
            if bar is not None:
                bar.update(stride)
        f.flush()
        _drop(f.fileno(), 0)
    if bar is not None:
        bar.close()
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "checksum": CHECKSUM, "arch": "qwen3_moe", "config": cfg,
        "quant": {"method": "int4", "group_size": group, "scale_dtype": "F16"}, "alignment": ALIGN,
        "resident": {"file": RESIDENT_FILE, "file_nbytes": res_size, "tensors": res_meta},
        "experts": {"file": EXPERTS_FILE, "file_nbytes": total * stride, "num_experts": E,
                    "layers": list(range(layers)), "layer_slot": {str(i): i for i in range(layers)},
                    "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["moe_intermediate_size"],
                    "stride": stride, "bundle_nbytes": bundle_nbytes, "parts": parts, CHECKSUM: crcs},
    }
    (dst / MANIFEST).write_text(json.dumps(manifest))
    read_manifest(dst)  # the engine's own validation of what was written
    if v1_twin is not None:
        v1_twin.mkdir(parents=True, exist_ok=True)
        for fname in (RESIDENT_FILE, EXPERTS_FILE):
            os.link(dst / fname, v1_twin / fname)
        v1 = {k: v for k, v in manifest.items() if k != "checksum"}
        v1["version"] = 1
        v1["resident"] = {**manifest["resident"], "tensors": {
            n: {**{k: v for k, v in t.items() if k != CHECKSUM}, V1_CHECKSUM: res_v1[n]} for n, t in res_meta.items()}}
        v1["experts"] = {**{k: v for k, v in manifest["experts"].items() if k != CHECKSUM},
                         V1_CHECKSUM: [v1_pool[i % pool] for i in range(total)]}
        (v1_twin / MANIFEST).write_text(json.dumps(v1))
        read_manifest(v1_twin)


# --------------------------------------------------------------------------- the worker

def worker(a: argparse.Namespace) -> None:
    from moe_stream import join_cgroup, measure_ceiling

    join_cgroup(a.cgroup)
    import torch

    from local_engine.models.moe import MoEModel

    torch.set_num_threads(1)
    experts = Path(a.pack) / "experts.bin"
    model = MoEModel.open(a.pack, memory_budget=a.budget, readers=a.readers, verify=a.verify)
    stride = model.m.stride
    before = measure_ceiling(experts, stride, a.readers, a.ceiling_s)
    g = torch.Generator().manual_seed(1)
    prompt = [int(x) for x in torch.randint(0, model.m.config["vocab_size"], (a.prompt,), generator=g)]
    pick = lambda lg: int(torch.multinomial(torch.softmax(lg, -1), 1, generator=g))  # noqa: E731
    t0 = time.perf_counter()
    toks = list(model.generate_ids(prompt, a.tokens, sample=pick))
    wall = time.perf_counter() - t0
    after = measure_ceiling(experts, stride, a.readers, a.ceiling_s)
    s = model.stats()
    model.close()
    print(json.dumps({**{k: v for k, v in s.items() if isinstance(v, int | float)}, "tokens": len(toks),
                      "wall_s": wall, "ceiling_before": before, "ceiling_after": after, "stride": stride}))


def run_worker(a: argparse.Namespace, pack: Path, verify: str, budget: int, limit: int) -> dict[str, Any]:
    from moe_stream import evict, make_cgroup

    evict(pack)  # cold: the writer dropped its pages already; a previous run's resident.bin reads too
    try:
        cg: Path | None = make_cgroup(f"desk-{verify}", limit)
    except OSError as e:
        print(f"# no memory cgroup here ({e}): this run is NOT memory-limited", flush=True)
        cg = None
    cmd = [sys.executable, __file__, "--worker", "--pack", str(pack), "--verify", verify, "--budget", str(budget),
           "--tokens", str(a.tokens), "--prompt", str(a.prompt), "--readers", str(a.readers),
           "--ceiling-s", str(a.ceiling_s)] + (["--cgroup", str(cg)] if cg else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        if p.returncode != 0:
            raise SystemExit(f"decode worker failed (rc {p.returncode}; killed by the cgroup's OOM killer if -9):\n"
                             f"{p.stderr[-2000:]}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        if cg is not None:
            out["cgroup_peak"] = int((cg / "memory.max_usage_in_bytes").read_text())
            out["cgroup_failcnt"] = int((cg / "memory.failcnt").read_text())
        return out
    finally:
        if cg is not None:
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=26.0, help="expert bank size to write, GB (1e9 bytes)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-width", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--pool", type=int, default=64, help="distinct experts repeated over the bank")
    ap.add_argument("--limit-gb", type=float, default=1.5, help="memory cgroup limit, GiB")
    ap.add_argument("--overhead-mb", type=int, default=700,
                    help="room left in the limit for Python, torch and read buffers (MiB)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=4)
    ap.add_argument("--readers", type=int, default=8, help="the expert store's reader threads (its default)")
    ap.add_argument("--ceiling-s", type=float, default=3.0, help="seconds of each I/O-bound measurement")
    ap.add_argument("--verify", default="first,first:crc32,never",
                    help="decode rows: the store's verify modes; first:crc32 = first on a version 1 (zlib crc32) twin")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the pack (default: a temp dir in benchmarks/.work)")
    ap.add_argument("--keep", action="store_true", help="do not delete the pack afterwards")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pack", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cgroup", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    out("$ " + " ".join(shlex.quote(x) for x in [".venv/bin/python", *sys.argv]))
    out(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load average {os.getloadavg()[0]:.2f} at start, "
        f"{os.cpu_count()} CPUs")
    from local_engine.formats.pack import read_manifest

    # experts per layer from the size: one bundle's stride is known once the pool is quantised,
    # so size it from a one-expert pool first (cheap)
    probe = config(1, 1, a.hidden, a.expert_width, 1)
    _, one = expert_pool(probe, 1, a.group, 0)
    experts = max(a.top_k, math.ceil(a.size_gb * 1e9 / (a.layers * len(one[0]))))
    cfg = config(a.layers, experts, a.hidden, a.expert_width, a.top_k)
    work = ROOT / "benchmarks" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    base = a.dir or Path(tempfile.mkdtemp(prefix="desk-scale-", dir=work))
    pack = base / "pack"
    rows = a.verify.split(",")
    for r in rows:
        mode, _, algo = r.partition(":")
        if mode not in ("first", "always", "never") or algo not in ("", "crc32"):
            raise SystemExit(f"--verify: {r!r} is not first|always|never, optionally with :crc32")
    twin = base / "pack-v1" if any(r.endswith(":crc32") for r in rows) else None
    try:
        t0 = time.perf_counter()
        write_pack(pack, cfg, a.group, min(a.pool, a.layers * experts), seed=0, progress=not a.no_progress,
                   v1_twin=twin)
        m = read_manifest(pack)
        write_s = time.perf_counter() - t0
        size = m.expert_bank_bytes + m.resident_bytes
        limit = int(a.limit_gb * GiB)
        budget = limit - m.resident_bytes - a.overhead_mb * MiB
        if budget < a.top_k * m.stride:
            raise SystemExit(f"--limit-gb {a.limit_gb} leaves no expert cache (resident {m.resident_bytes / MiB:.0f} "
                             f"MiB + overhead {a.overhead_mb} MiB)")
        out(f"# pack: qwen3_moe int4 g{a.group}, {a.layers} layers x {experts} experts (top-{a.top_k}), hidden "
            f"{a.hidden}, expert width {a.expert_width}; bundle {m.stride / MiB:.2f} MiB; experts "
            f"{m.expert_bank_bytes / 1e9:.2f} GB + resident {m.resident_bytes / 1e6:.0f} MB; written in "
            f"{write_s:.0f} s ({m.expert_bank_bytes / write_s / 1e6:.0f} MB/s) from a pool of {a.pool} experts; "
            f"checksum {m.checksum} (format version {m.raw['version']})")
        out(f"# memory: cgroup v1 limit {limit / GiB:.2f} GiB (page cache counted), expert cache budget "
            f"{budget / MiB:.0f} MiB; model size / limit = {size / limit:.1f}x; decode {a.tokens} tokens after a "
            f"{a.prompt}-token prompt, cold, 1 torch thread, {a.readers} reader threads")
        out("")
        out("| verify | model size / limit | MB read / token | decode tok/s | disk MB/s (O_DIRECT, bundle-sized, "
            "before / after) | I/O bound tok/s | tok/s / bound (target >= 0.6) | hit rate | I/O wait | read MB/s "
            "while reading | compute s/token | tok/s / max(I/O, compute) bound | cgroup peak MiB | load avg |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for verify in rows:
            mode, _, algo = verify.partition(":")
            r = run_worker(a, pack if not algo else twin, mode, budget, limit)
            per_tok = r["decode_bytes_read_per_token"]
            disk = (r["ceiling_before"] + r["ceiling_after"]) / 2
            bound = disk / per_tok if per_tok else math.inf
            tok_s = r["decode_tok_s"]
            decode_s = r["decode_tokens"] / tok_s if tok_s else math.inf
            compute = (decode_s - r["decode_io_wait_s"]) / r["decode_tokens"]
            out(f"| {verify} | {size / limit:.1f}x | {per_tok / 1e6:.0f} | {tok_s:.3f} | {disk / 1e6:.0f} "
                f"({r['ceiling_before'] / 1e6:.0f} / {r['ceiling_after'] / 1e6:.0f}) | {bound:.3f} | "
                f"{tok_s / bound:.2f} | {r['decode_hit_rate']:.3f} | {r['decode_io_wait_s'] / decode_s:.0%} | "
                f"{r['decode_read_bandwidth_Bps'] / 1e6:.0f} | {compute:.3f} | {tok_s * max(per_tok / disk, compute):.2f} "
                f"| {r.get('cgroup_peak', 0) / MiB:.0f} | {os.getloadavg()[0]:.2f} |")
        out("\nMB read / token, tok/s, hit rate, I/O wait: decode only (the prompt's prefill excluded); I/O wait = "
            "share of decode time blocked on reads. disk MB/s: random whole-bundle O_DIRECT reads of experts.bin on "
            f"{a.readers} threads for {a.ceiling_s:g} s, in the decode's process, before and after it; I/O bound = "
            "disk MB/s / MB read per token. read MB/s while reading: the decode's bytes / its wall time with >= 1 "
            "read in flight. compute s/token: decode time not blocked on reads (the CPU's share, checksums in the "
            "reader threads included, on a box shared with other jobs: see load avg); max(I/O, compute) bound = "
            "1 / max(MB per token / disk MB/s, compute s/token), i.e. reads and compute perfectly overlapped.")
    finally:
        if not a.keep:
            for d in [base] if a.dir is None else [pack, twin]:
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)
            out(f"# deleted {pack}" + (f" and {twin}" if twin else ""))
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
