"""A/B of the gateway's added latency between two source trees, in one run, requests interleaved.

    flock /tmp/bench.lock .venv/bin/python benchmarks/ab_trees.py OLD_TREE [NEW_TREE] [--requests N]

OLD_TREE / NEW_TREE: checkouts of this repository (e.g. `git worktree add --detach /tmp/old <commit>`;
NEW_TREE defaults to this one), both run with this .venv's Python, each with PYTHONPATH set to its
tree. Paths, all c=1 against one loopback fake upstream (gateway_overhead.py's, its own process),
classification off (gateway_overhead's hg-off policy):

  direct     client -> upstream (the baseline)
  old        client -> OLD_TREE's `serve` -> upstream
  new        client -> NEW_TREE's `serve` -> upstream
  new+otel   the same as new, with OpenTelemetry traces on, exported over OTLP/HTTP to a loopback
             sink in this process (what turning tracing on costs)

One request per path in turn, the order rotating, so a burst of load from other work on a shared
machine lands on every path alike (gateway_overhead.py's `measure_interleaved`). Prints p50/p99,
the added p50 against direct, and new - old.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_overhead import (  # the sibling script, as a module
    CLASSIFY_OFF,
    ENV,
    HG_POLICY,
    Sample,
    Server,
    free_port,
    measure_interleaved,
    start_upstream,
    wait_http,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ab_trees.txt"


class _Sink(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()


def start_tree(name: str, tree: Path, policy: Path, extra_env: dict[str, str] | None = None) -> Server:
    port = free_port()
    env = {**ENV, "PYTHONPATH": str(tree), **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(port),
                             "--log-level", "ERROR", "--no-watch"], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=300)
    return Server(name, proc, f"http://127.0.0.1:{port}", model="auto")


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 2 else float("nan")


def table(samples: dict[str, Sample], title: str) -> list[str]:
    base = statistics.median(samples["direct"].latencies) * 1000
    lines = [title, f"{'path':<10} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'n':>6} {'errors':>6}"]
    for name, s in samples.items():
        med = statistics.median(s.latencies) * 1000
        added = "-" if name == "direct" else f"{med - base:.3f}"
        lines.append(f"{name:<10} {med:8.3f} {p(s.latencies, 99):8.3f} {added:>10} {len(s.latencies):6d} {s.errors:6d}")
    old, new = (statistics.median(samples[k].latencies) * 1000 for k in ("old", "new"))
    lines.append(f"new - old added p50: {new - old:+.3f} ms")
    if "new+otel" in samples:
        lines.append(f"tracing on - off added p50: {statistics.median(samples['new+otel'].latencies) * 1000 - new:+.3f} ms")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path, nargs="?", default=ROOT)
    ap.add_argument("--requests", type=int, default=1500, help="per path and mode")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ab-trees-"))
    up_port = free_port()
    upstream = start_upstream(up_port)
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    policy = tmp / "hg-off.yaml"
    policy.write_text(textwrap.dedent(HG_POLICY).format(port=up_port, classification=CLASSIFY_OFF, rules="",
                                                        redact="false", wire_targets=""))
    servers = []
    try:
        servers = [start_tree("old", args.old.resolve(), policy), start_tree("new", args.new.resolve(), policy),
                   start_tree("new+otel", args.new.resolve(), policy,
                              {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}"})]
        direct = Server("direct", upstream, f"http://127.0.0.1:{up_port}", model="fake-model")
        paths = [direct, *servers]
        load0 = os.getloadavg()[0]
        asyncio.run(measure_interleaved(paths, stream=False, requests=50))  # warm-up, not counted
        out = [f"# $ {' '.join(['.venv/bin/python', *sys.argv])}",
               f"# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} old={args.old} new={args.new}; 2 cores; "
               f"load average at start {load0:.1f}"]
        for stream in (False, True):
            samples = asyncio.run(measure_interleaved(paths, stream=stream, requests=args.requests))
            out += table(samples, f"c=1 {'stream' if stream else 'json'}, {args.requests} requests per path, "
                                  "interleaved")
        out.append(f"# load average at end {os.getloadavg()[0]:.1f}")
        text = "\n".join(out)
        print(text)
        if not args.no_save:
            with RESULTS.open("a") as f:
                f.write(text + "\n\n")
    finally:
        for s in servers:
            s.stop()
        upstream.terminate()
        sink.shutdown()


if __name__ == "__main__":
    main()
