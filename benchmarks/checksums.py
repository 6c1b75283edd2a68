"""Checksum candidates for pack verification (issue #24): GB/s on one core, and whether two threads
scale (the GIL released: the engine checks bundles in its reader threads, beside compute).

Each candidate hashes the same random buffer of one desk-scale int4 bundle (2.39 MiB) from a
writable memoryview, as the expert store does (its read buffers are anonymous mmaps);
``google_crc32c`` takes only read-only buffers, so its row includes the copy the engine would need.
Ratios are against zlib.crc32 (the version 1 pack checksum) in the same run.

    flock /tmp/bench.lock .venv/bin/python benchmarks/checksums.py --out benchmarks/results/checksums.txt
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUNDLE = 2_506_752  # bytes: the desk-scale int4 bundle's stride (hidden 2048, width 768, group 64)


def candidates() -> dict[str, Callable[[Any], int]]:
    import crc32c

    out: dict[str, Callable[[Any], int]] = {"zlib.crc32": zlib.crc32,
                                            f"crc32c.crc32c (hardware={crc32c.hardware_based})": crc32c.crc32c}
    try:
        import google_crc32c  # optional: not a dependency, measured when installed
    except ImportError:
        return out
    out[f"google_crc32c.value ({google_crc32c.implementation}, + bytes copy)"] = lambda b: google_crc32c.value(bytes(b))
    return out


def rate(f: Callable[[Any], int], view: memoryview, seconds: float) -> float:
    f(view)
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        f(view)
        n += 1
    return n * len(view) / dt


def two_thread_speedup(f: Callable[[Any], int], views: list[memoryview], reps: int) -> float:
    def work(v: memoryview) -> None:
        for _ in range(reps):
            f(v)

    t0 = time.perf_counter()
    for v in views:
        work(v)
    serial = time.perf_counter() - t0
    threads = [threading.Thread(target=work, args=(v,)) for v in views]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return serial / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per candidate")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    out("$ " + " ".join(shlex.quote(x) for x in [".venv/bin/python", *sys.argv]))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    out(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {cpu}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; buffer {BUNDLE / 2**20:.2f} MiB (one bundle), writable")
    bufs = [bytearray(os.urandom(BUNDLE)) for _ in range(2)]
    views = [memoryview(b) for b in bufs]
    cands = candidates()
    ref = zlib.crc32(views[0])
    out("")
    out("| checksum | GB/s, one thread | x zlib.crc32 | ms per bundle | 2 threads / 1 thread throughput | load avg |")
    out("|---|---|---|---|---|---|")
    base = 0.0
    for name, f in cands.items():
        if name == "zlib.crc32":
            assert f(views[0]) == ref
        r = rate(f, views[0], a.seconds)
        base = base or r
        reps = max(1, int(r * a.seconds / 4 / BUNDLE))
        out(f"| {name} | {r / 1e9:.2f} | {r / base:.1f} | {BUNDLE / r * 1e3:.3f} | "
            f"{two_thread_speedup(f, views, reps):.2f} | {os.getloadavg()[0]:.2f} |")
    out("\n2 threads / 1 thread: the same work on two threads vs serially; ~2 means the GIL is released, but "
        "only with a free core: on a loaded box (load avg >= CPUs) every row reads ~1 whatever the GIL does. "
        "By their code, zlib.crc32 releases the GIL above 5 KiB, crc32c.crc32c above 32 KiB (gil_release_mode=-1).")
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
