"""What one admit call costs in the gateway's process: the embedded store, RedisStore as the
gateway calls it, and the bare redis-py calls under it (where the time goes: the client, the pool,
the script, the server), sequential, interleaved call by call, on a redis-server started for the
run (issue #22: Redis adds <= 0.5 ms over embedded at c=1).

    /work/bin/benchslot .venv/bin/python benchmarks/store_roundtrip.py [--calls 5000] [--uvloop]

"admit carrying a settle" is the steady state since the settles ride on the next admit: the
previous request's settle (its hold released, 8 counters added) and this request's admit, one
EVALSHA; "admit, then a settle" is what a request cost before (two calls). --uvloop runs on the
loop the gateway serves on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from benchmarks.gateway_overhead import start_redis
from gateway.store.base import Bucket, Hold, Settle
from gateway.store.embedded import EmbeddedStore
from gateway.store.redis import _ADMIT, RedisStore

BUCKETS = [Bucket("rl:bench:requests", 1e9, 60, 1), Bucket("rl:bench:tokens", 1e12, 60, 300)]


def hold() -> Hold:
    return Hold(key="usage:bench:day:x", id=os.urandom(12).hex(), usd=1e-6, limit_usd=1e9, ttl_s=3600, lapse_s=90)


# What Budgets.charge settles for one answer from one target.
AMOUNTS = {"requests": 1, "estimated": 0, "prompt_tokens": 300, "completion_tokens": 16, "usd": 5.4e-5,
           "usd:cloud": 5.4e-5, "tokens:cloud": 316}


def settle_of(h: Hold) -> Settle:
    return Settle(h.key, h.id, AMOUNTS, h.ttl_s)


async def run(url: str, calls: int) -> list[tuple[str, list[float]]]:
    embedded = EmbeddedStore()
    store = RedisStore(url)
    pooled = Redis.from_url(url)
    single = Redis.from_url(url, single_connection_client=True)
    sha = await pooled.script_load(_ADMIT)

    def raw_args() -> list[str | float]:
        h = hold()
        keys = ["hg:rl:bench:requests", "hg:rl:bench:tokens", "hg:usage:bench:day:x", "hg:usage:bench:day:x:holds"]
        args: list[str | float] = [2, 0, 1e9, 1e9 / 60, 1, 1e12, 1e12 / 60, 300, h.id, repr(h.usd), repr(h.limit_usd),
                                   3_600_000, 90]
        return [*keys, *args]

    async def embedded_admit() -> None:
        h = hold()
        await embedded.admit(BUCKETS, h)
        # Settled as a request would be, so holds do not pile up (the embedded store sums the
        # holds in flight on each admit).
        embedded._holds.get(h.key, {}).pop(h.id, None)

    previous = [hold()]

    async def carrying() -> None:
        h = hold()
        await store.admit(BUCKETS, h, [settle_of(previous[0])])
        previous[0] = h

    async def then_settle() -> None:
        h = hold()
        await store.admit(BUCKETS, h)
        await store.settle(h.key, h.id, AMOUNTS, h.ttl_s)

    cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("embedded admit", embedded_admit),
        ("RedisStore.admit", lambda: store.admit(BUCKETS, hold())),
        ("admit carrying a settle", carrying),
        ("admit, then a settle", then_settle),
        ("evalsha, pool", lambda: pooled.evalsha(sha, 4, *raw_args())),
        ("evalsha, one connection", lambda: single.evalsha(sha, 4, *raw_args())),
        ("PING, pool", lambda: pooled.ping()),
    ]
    for _, fn in cases:  # warm: scripts loaded, connections open
        for _ in range(200):
            await fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(calls):
        for name, fn in cases:
            t0 = time.perf_counter()
            await fn()
            samples[name].append((time.perf_counter() - t0) * 1e6)
    await store.aclose()
    await pooled.aclose()
    await single.aclose()
    return [(name, samples[name]) for name, _ in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop, as the gateway does")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    tmp = Path(tempfile.mkdtemp(prefix="store-rt-"))
    proc, url = start_redis(tmp)
    try:
        results = asyncio.run(run(url, args.calls))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"one admit call (2 buckets + a budget hold), sequential, {args.calls} calls each, interleaved, "
          f"{'uvloop' if args.uvloop else 'asyncio'} loop; load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':<26}{'p50 us':>9}{'p90 us':>9}{'p99 us':>9}")
    for name, xs in results:
        q = statistics.quantiles(xs, n=100)
        print(f"{name:<26}{statistics.median(xs):9.1f}{q[89]:9.1f}{q[98]:9.1f}")


if __name__ == "__main__":
    main()
