"""Time to first token of the default policy against a cloud with a heavy-tailed first-token latency:
no slowness limits (the gateway before issue 25) vs the shipped first-token deadline vs hedging.

    .venv/bin/python benchmarks/hedging.py             # ~3 minutes: 200 requests a mode
    .venv/bin/python benchmarks/hedging.py --quick     # 60 requests a mode, not saved

`hybrid-gateway serve` runs policies/default.yaml as shipped (the local target is the in-process
engine with the built-in SmolLM2-135M), with CLOUD_API_KEY set and CLOUD_API_BASE pointing at a
fake OpenAI-compatible cloud on loopback (tests/support/upstream.py, in this process) whose first
byte comes after a latency drawn per request: 95 % lognormal (median 0.35 s, sigma 0.5, at most
1.5 s), 5 % 10 s. Requests name `model: cloud` (a pin: the chain is cloud -> local under the
`default` rule), so the routing does not depend on the difficulty score of the prompt. Modes:

  none       the cloud target's `first_token_timeout_s` and `stall_timeout_s` lines removed
  deadline   the default policy as shipped (cloud first token 2 s)
  hedge      as shipped, plus `hedge_after_s` on the `default` rule

Each mode sends the same latency sequence (one seed) from `--concurrency` client threads, streams
with max_tokens 16, and measures the time to the first content token at the client. The local
engine's load is stated from its own counters (/metrics): sequences completed and cancelled.
Prints the table and writes it to benchmarks/results/hedging.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_process import free_port, wait_ready  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "hedging.txt"
TAIL_S, TAIL_SHARE = 10.0, 0.05


def latencies(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [TAIL_S if rng.random() < TAIL_SHARE else min(1.5, rng.lognormvariate(-1.05, 0.5)) for _ in range(n)]


def policy_text(mode: str, hedge_after_s: float) -> str:
    text = (ROOT / "policies" / "default.yaml").read_text()
    if mode == "none":
        text = re.sub(r"\n    (first_token_timeout_s|stall_timeout_s): .*", "", text)
    if mode == "hedge":
        text, n = re.subn(r"(  - name: default\n(?:    .*\n)*?    route: local\n)",
                          rf"\1    hedge_after_s: {hedge_after_s}\n", text)
        assert n == 1, "the default rule of policies/default.yaml moved: update this benchmark"
    return text


def engine_counts(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10, trust_env=False).text
    out: dict[str, float] = {}
    hedges = re.findall(r"^hybrid_hedges_total{[^}]*} ([0-9.e+]+)", text, re.M)
    out["hedges"] = sum(float(h) for h in hedges)
    for stat in ("completed", "cancelled"):
        m = re.search(rf'hybrid_engine_stat{{stat="{stat}",target="local"}} ([0-9.e+]+)', text) or re.search(
            rf'hybrid_engine_stat{{target="local",stat="{stat}"}} ([0-9.e+]+)', text)
        out[stat] = float(m.group(1)) if m else 0.0
    return out


def one(client: httpx.Client, i: int) -> tuple[float, str, str]:
    body = {"model": "cloud", "stream": True, "max_tokens": 16,
            "messages": [{"role": "user", "content": f"Say hello to visitor number {i}."}]}
    t0 = time.monotonic()
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        route = resp.headers.get("x-hybrid-route", "-")
        fallback = resp.headers.get("x-hybrid-fallback", "")
        first = None
        for line in resp.iter_lines():
            if first is None and line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunk = json.loads(line[5:])
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    first = time.monotonic() - t0
    if resp.status_code != 200 or first is None:
        return float("inf"), route, f"status {resp.status_code}"
    return first, route, fallback


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run_mode(mode: str, delays: list[float], args: argparse.Namespace) -> dict[str, Any]:
    lock = threading.Lock()
    queue = list(delays)

    def reply(body: dict[str, Any]) -> str:
        with lock:
            delay = queue.pop(0) if queue else 0.3
        time.sleep(delay)  # before the first byte: the status line waits too
        return "Hello there, visitor! Nice to meet you."

    with FakeUpstream(model="cloud-model", name="cloud", reply=reply) as cloud:
        assert cloud._server is not None
        cloud._server.handle_error = lambda *a: None  # type: ignore[method-assign]  # abandoned calls: broken pipes
        tmp = Path(tempfile.mkdtemp(prefix="hedging-"))
        policy = tmp / "policy.yaml"
        policy.write_text(policy_text(mode, args.hedge_after))
        port = free_port()
        env = {**os.environ, "CLOUD_API_KEY": "sk-bench", "CLOUD_API_BASE": cloud.base_url,
               "CLOUD_MODEL": "openai/cloud-model", "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}
        proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "hybrid-gateway"), "serve", "--policy", str(policy),
                                 "--port", str(port), "--log-level", "ERROR", "--no-watch"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base + "/readyz", proc)
            with httpx.Client(base_url=base, timeout=60, trust_env=False) as warm:
                for i in range(3):  # the engine's first sequence and the classifiers' first call
                    warm.post("/v1/chat/completions", json={"model": "local", "max_tokens": 4, "messages": [
                        {"role": "user", "content": f"warm up {i}"}]})
            before = engine_counts(base)
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                clients = [httpx.Client(base_url=base, timeout=60, trust_env=False) for _ in range(args.concurrency)]
                results = list(pool.map(lambda i: one(clients[i % args.concurrency], i), range(len(delays))))
                for c in clients:
                    c.close()
            wall = time.monotonic() - t0
            after = engine_counts(base)
        finally:
            proc.terminate()
            proc.wait(15)
    ttft = [r[0] for r in results]
    return {
        "mode": mode, "n": len(results), "p50": pct(ttft, 0.5), "p90": pct(ttft, 0.9), "p99": pct(ttft, 0.99),
        "max": max(ttft), "failed": sum(1 for t in ttft if t == float("inf")),
        "local": sum(1 for r in results if r[1] == "local"),
        "hedge_won": sum(1 for r in results if "hedge_won" in r[2]),
        "slow": sum(1 for r in results if "slow_first_token" in r[2]),
        "engine_done": after["completed"] - before["completed"],
        "engine_cancelled": after["cancelled"] - before["cancelled"], "wall": wall,
        "hedges": after["hedges"] - before["hedges"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--hedge-after", type=float, default=0.75, help="about the p90 of the healthy latencies")
    ap.add_argument("--seed", type=int, default=25)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.requests = 60
    delays = latencies(args.requests, args.seed)
    tail = sum(1 for d in delays if d == TAIL_S)
    load_start = os.getloadavg()
    rows = [run_mode(mode, delays, args) for mode in ("none", "deadline", "hedge")]
    load_end = os.getloadavg()
    lines = [
        f"hedging: {args.requests} streamed requests a mode, {args.concurrency} clients, model: cloud (chain "
        f"cloud -> local engine, SmolLM2-135M), max_tokens 16; cloud first byte: {tail} at {TAIL_S:g} s, the rest "
        f"lognormal median 0.35 s (cap 1.5 s), seed {args.seed}; hedge_after_s {args.hedge_after:g}",
        f"{'mode':<9} {'p50 s':>6} {'p90 s':>6} {'p99 s':>6} {'max s':>6} {'failed':>6} {'local':>6} "
        f"{'slow1st':>7} {'hedges':>6} {'won':>4} {'engine done/cancelled':>22} {'wall s':>7}",
    ]
    for r in rows:
        lines.append(f"{r['mode']:<9} {r['p50']:6.2f} {r['p90']:6.2f} {r['p99']:6.2f} {r['max']:6.2f} {r['failed']:6d} "
                     f"{r['local']:6d} {r['slow']:7d} {int(r['hedges']):6d} {r['hedge_won']:4d} "
                     f"{int(r['engine_done']):>14d}/{int(r['engine_cancelled']):<7d} {r['wall']:7.1f}")
    none, hedge = rows[0], rows[2]
    lines.append(f"p99 none / hedge = {none['p99'] / hedge['p99']:.1f}x; p99 deadline / hedge = "
                 f"{rows[1]['p99'] / hedge['p99']:.1f}x")
    lines.append(f"load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in load_start)}, at end "
                 f"{'/'.join(f'{x:.1f}' for x in load_end)} on {os.cpu_count()} CPUs")
    print("\n".join(lines))
    if not args.quick:
        RESULTS.write_text("$ .venv/bin/python benchmarks/hedging.py\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
